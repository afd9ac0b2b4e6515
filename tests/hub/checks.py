"""The checks every fixture family passes (each family's test module imports them and names its
`FAMILY`): logits match transformers' float32 ones (tools/make_hub_fixtures.py),
whole, packed with segment ids, and through prefill + one-token decode steps; save -> load gives
the same weights bit for bit, in float32 and in bfloat16; a mesh places them sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax import hub
from linear_jax.hub import files
from linear_jax.hub.family import pieces
from tests.hub.common import FAMILIES, ROOT, golden
from tests.utils import assert_close

TOL = 1e-4


def forward(model):
    """Jitted: eager dispatch of the small ops costs far more than one compile."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, t, seg: nnx.merge(graphdef, s)(t, segment_ids=seg)[0])
    return lambda tokens, segment_ids=None: f(state, jnp.asarray(tokens), segment_ids)


@pytest.fixture(scope="module")
def loaded(request):
    family = request.module.FAMILY
    assert family in FAMILIES, f"no fixture for {family}: run tools/make_hub_fixtures.py"
    return family, hub.load(ROOT / family), golden(family)


def test_logits(loaded):
    family, model, g = loaded
    assert_close(forward(model)(g["prompt_a"]), g["logits_a"], TOL, f"{family} prompt a")


def test_packed(loaded):
    """Prompt b alone is checked here too: its document starts mid-row."""
    family, model, g = loaded
    a, b = g["prompt_a"], g["prompt_b"]
    tokens = np.concatenate([a, b], 1)
    seg = np.concatenate([np.zeros_like(a), np.ones_like(b)], 1)
    logits = forward(model)(tokens, jnp.asarray(seg))
    want = np.concatenate([g["logits_a"], g["logits_b"]], 1)
    assert_close(logits, want, TOL, f"{family} packed")


def test_decode(loaded):
    """A prefill of 5 tokens, then the rest one by one through the cache."""
    family, model, g = loaded
    prompt, P = jnp.asarray(g["prompt_a"]), 5
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c)[:2])
    cache = model.init_cache(1, prompt.shape[1])
    out, cache = call(state, prompt[:, :P], cache)
    outs = [out]
    for t in range(P, prompt.shape[1]):
        out, cache = call(state, prompt[:, t:t + 1], cache)
        outs.append(out)
    assert_close(jnp.concatenate(outs, 1), g["logits_a"], TOL, f"{family} decode")


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(
        nnx.state(model, nnx.Param))}


def _assert_same(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


@pytest.mark.parametrize("shard", [None, 20_000])
def test_round_trip(loaded, tmp_path, shard):
    family, model, _ = loaded
    hub.save(model, tmp_path, max_shard_bytes=shard)
    assert ((tmp_path / files.INDEX).is_file()) == bool(shard)
    again = hub.load(tmp_path)
    assert again.config == model.config
    _assert_same(again, model)
    # and the stored bytes are the fixture's, tensor for tensor (buffers the config implies,
    # recomputed on save, only to rounding: the load checks them with a tolerance), under the
    # names of the format saved (a multimodal checkpoint's language model is saved as its text
    # LM: other names, and the parts not loaded left out)
    src, dst = files.entries(ROOT / family), files.entries(tmp_path)
    hf = files.read_config(ROOT / family)
    fam, saved = hub.FAMILIES[hf["architectures"][0]], hub.FAMILIES[model.config.hub_format]
    theirs, ours = _by_target(fam.tensors(model.config, hf)), _by_target(saved.tensors(
        model.config, files.read_config(tmp_path)))
    rename = {theirs[k]: ours[k] for k in theirs}
    derived = fam.derived(model.config) if fam.derived else {}
    assert set(dst) == set(rename.values()) | set(derived)
    assert all(n.startswith(fam.ignored) for n in set(src) - set(rename) - set(derived))
    for n in rename:
        np.testing.assert_array_equal(files.array(dst[rename[n]]), files.array(src[n]),
                                      err_msg=n)


def _by_target(table: dict) -> dict:
    """{the parameters a tensor fills: its name}, for a family's tensor table."""
    return {tuple((p.path, p.index, None if p.cols is None else int(p.cols[0]))
                  for p in pieces(e)): n for n, e in table.items()}


def test_bfloat16_stays(loaded, tmp_path):
    family, _, g = loaded
    model = hub.load(ROOT / family, param_dtype="bfloat16")
    assert {v.dtype for v in _params(model).values()} == {np.dtype(jnp.bfloat16)}
    hub.save(model, tmp_path)
    assert {e.dtype for e in files.entries(tmp_path).values()} == {"BF16"}
    again = hub.load(tmp_path)
    assert again.config.param_dtype == "bfloat16"
    _assert_same(again, model)
    assert_close(forward(again)(g["prompt_a"]), g["logits_a"], 5e-2, f"{family} bf16")


def test_mesh(loaded):
    """Placed as read: FSDP over 2 devices, tensor parallel over 2."""
    family, model, g = loaded
    if jax.device_count() < 4:
        pytest.skip("needs 4 host devices (tests/conftest.py sets 8)")
    from linear_jax.parallel import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "seq": 1}, jax.devices()[:4])
    sharded = hub.load(ROOT / family, mesh=mesh)
    embed = sharded.embed.get_value()
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(embed.addressable_shards) == 4
    _assert_same(sharded, model)
