"""The layers as a scan: the compiled train step does not grow with depth, runs of layers of the
same structure are cut into repeated periods, stacked parameters carry an unsharded `layers`
axis, and the scanned forward equals the layer-by-layer one (decoding) and its gradients."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from linear_jax.models import LM, LMConfig
from linear_jax.models.lm import LAYERS_AXIS, periods
from linear_jax.training import mesh_from_config, sharding, step
from tests.utils import assert_close

VOCAB = 32


def _train_step_ops(cfg: LMConfig) -> int:
    """StableHLO ops of the lowered train step (forward, backward, AdamW), nothing compiled."""
    tx = optax.adamw(1e-3)
    init = step.init_fn(lambda: LM(cfg, rngs=nnx.Rngs(0)), tx)
    out = {}

    def shapes():
        out["graphdef"], state = init()
        return state

    state = jax.eval_shape(shapes)
    i32 = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    batch = {"tokens": i32, "targets": i32, "segment_ids": i32,
             "mask": jax.ShapeDtypeStruct((2, 32), jnp.float32)}
    text = jax.jit(step.make_train_step(out["graphdef"], tx)).lower(state, batch).as_text()
    return len(re.findall(r"= (?:stablehlo|chlo|func)\.", text))


@pytest.mark.parametrize("over", [dict(mixer="attention"), dict(mixer="gated_deltanet"),
                                  dict(mixer="mamba2", ffn="moe", num_experts=2, top_k=1),
                                  dict(mixer="lightning"),
                                  dict(mixer="gla", attn_every=2)],
                         ids=["attention", "gated_deltanet", "mamba2-moe", "lightning",
                              "gla+attention"])
def test_train_step_size_does_not_grow_with_depth(over):
    """2 and 8 layers lower to programs of about the same size (unrolled, 8 layers are ~4x):
    compile time follows (experiments/benchmarks/compile_time.py)."""
    size = {L: _train_step_ops(LMConfig(vocab_size=VOCAB, d_model=32, num_layers=L, num_heads=2,
                                        chunk_size=8, **over)) for L in (2, 8)}
    assert size[8] <= 1.05 * size[2], size


def test_periods_cut_runs_of_repeats():
    assert periods("a" * 12) == [(1, 12)]
    assert periods("aaab" * 3) == [(4, 3)]                            # attn_every=4
    assert periods("aab" * 2 + "aa") == [(3, 2), (1, 2)]              # 8 layers, attn_every=3
    assert periods("abcbcbc") == [(1, 1), (2, 3)]
    assert periods("abcd") == [(4, 1)]                                # nothing repeats
    assert periods("ab") == [(2, 1)]
    cfg = LMConfig(vocab_size=VOCAB, d_model=16, num_layers=8, num_heads=2, mixer="gla",
                   attn_every=4, ffn="moe", moe_every=2, num_experts=2, top_k=1)
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    assert [(len(s.blocks), s.repeats) for s in model.stacks] == [(4, 2)]
    assert [model.layer_mixer(i).__class__.__name__ for i in range(8)] == (
        ["GLA"] * 3 + ["Attention"]) * 2
    assert [type(model.layer(i).ffn).__name__ for i in (0, 1)] == ["MLP", "MoE"]


def test_stacked_parameters_shard_with_an_unsharded_layers_axis():
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, num_layers=4, num_heads=2, mixer="gla")
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    kernel = model.stacks[0].blocks[0].mixer.q_proj.kernel
    assert kernel.shape == (4, 32, 16)
    assert kernel.get_metadata()["out_sharding"] == (LAYERS_AXIS, "embed", "heads")
    mesh = mesh_from_config({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    rules = sharding.check_rules((("embed", "fsdp"), ("heads", "tensor")))
    sh = sharding.tree_shardings(nnx.state(model, nnx.Param), mesh, rules)
    assert sh["stacks"][0]["blocks"][0]["mixer"]["q_proj"]["kernel"].get_value().spec == P(
        None, "fsdp", "tensor")
    assert sh["embed"].get_value().spec == P(None, "fsdp")            # vocab: no rule here


def test_scan_equals_layer_by_layer_and_unstacked():
    """The scanned call (no cache) equals the layer-by-layer one (a fresh cache), on the model
    and on its `unstacked()` copy; Lightning's per-layer decays ride the stack; gradients of the
    scanned model are those of the unstacked one."""
    cfg = LMConfig(vocab_size=VOCAB, d_model=16, num_layers=4, num_heads=2, mixer="lightning",
                   attn_every=2, chunk_size=8, init_std=0.1)
    model = LM(cfg, rngs=nnx.Rngs(0))
    assert [(len(s.blocks), s.repeats) for s in model.stacks] == [(2, 2)]
    decays = [np.asarray(model.layer(i).mixer.log_decay[...]) for i in (0, 2)]
    assert not np.allclose(*decays)
    flat = model.unstacked()
    assert len(flat.stacks) == 4 and all(s.repeats == 1 for s in flat.stacks)
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, VOCAB)
    seg = jnp.asarray(np.repeat([[0] * 9 + [1] * 11], 2, 0), jnp.int32)

    def loss(m):                  # with the logits: the forwards come from the gradients' runs
        logits = m(tokens, segment_ids=seg)[0]
        return jnp.mean(logits ** 2), logits
    g1, scanned = jax.jit(nnx.grad(loss, has_aux=True))(model)
    g2, unstacked = jax.jit(nnx.grad(loss, has_aux=True))(flat)
    cached = jax.jit(lambda m, t, s, c: m(t, segment_ids=s, cache=c)[0])(
        model, tokens, seg, model.init_cache(2, 20))
    assert_close(cached, scanned, 1e-5, "cached")
    assert_close(unstacked, scanned, 1e-5, "unstacked")
    for i in range(4):
        a = g1.stacks[0].blocks[i % 2].mixer.o_proj.kernel[...][i // 2]
        b = g2.stacks[i].blocks[0].mixer.o_proj.kernel[...][0]
        assert_close(a, b, 1e-5, f"d o_proj of layer {i}")
