"""The sequence-parallel forms of kda, mamba3 and mamba3_mimo equal their single-device ops:
outputs, final state and the gradient of every float input (initial state included), with packed
documents that reset inside shards and exactly on shard boundaries. rwkv7 shares kda's form
(`parallel/rank_one.py`) and runs sequence-parallel in the layer test below (the forward: CI
time). Layers whose parallel form is more than their op's (attention's gathers, MLA's latents, the
RG-LRU's conv halo and document starts) are compared whole: output and every gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax import _compat, layers, ops
from linear_jax import parallel as sp
from tests.parallel.common import TOL, C, H, K, V, packed_segments
from tests.utils import assert_close

pytestmark = pytest.mark.timeout(300)
T = 32


def _draw(op, B, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    g = -np.logaddexp(0, -rng.uniform(-1, 5, (B, T, H, K))).astype(np.float32)
    x = {"q": f(B, T, H, K), "k": unit(f(B, T, H, K)), "v": f(B, T, H, V), "g": g}
    if op == "kda":
        x["beta"] = rng.uniform(0, 2, (B, T, H)).astype(np.float32)
    if op.startswith("mamba3"):
        dt = np.logaddexp(0, f(B, T, H) - 1.0)
        x["g"] = -np.logaddexp(0, f(B, T, H)) * dt
        x.update(dt=dt, trap=1 / (1 + np.exp(-f(B, T, H))),
                 theta=np.tanh(f(B, T, H, K // 4)) * np.pi * dt[..., None])
    rank = (2,) if op == "mamba3_mimo" else ()       # r keys, queries and values per step
    if rank:
        x.update(q=f(B, T, H, *rank, K), k=f(B, T, H, *rank, K), v=f(B, T, H, *rank, V))
    x = {n: jnp.asarray(a, jnp.float32) for n, a in x.items()}
    x["initial_state"] = jnp.asarray(f(B, H, K, V))
    if op.startswith("mamba3"):
        x["initial_state"] = (x["initial_state"], jnp.asarray(f(B, H, *rank, K)),
                              jnp.asarray(f(B, H, *rank, V)))
    return x


@pytest.mark.parametrize("op,P", [("kda", 4), ("mamba3", 4), ("mamba3_mimo", 4)])
def test_matches_single_device(op, P):
    mesh = _compat.make_mesh((P,), ("seq",), jax.devices()[:P])
    x, seg = _draw(op, 2), packed_segments(2, T)
    single = lambda **a: getattr(ops, op)(**a, impl="chunk", chunk_size=C)
    par = lambda **a: getattr(sp, op)(**a, mesh=mesh, chunk_size=C)
    o1, S1 = jax.jit(lambda x: single(**x, segment_ids=seg))(x)
    o2, S2 = jax.jit(lambda x: par(**x, segment_ids=seg))(x)
    assert_close(o2, o1, TOL, f"{op} output")
    _close(S2, S1, f"{op} final state")
    w = jnp.sin(jnp.arange(V, dtype=jnp.float32) + 1.0)

    def loss(fn):
        def f(x):
            o, S = fn(**x, segment_ids=seg)
            return jnp.sum(o * w) + sum(jnp.sum(jnp.cos(s)) for s in jax.tree.leaves(S))
        return f

    g1, g2 = jax.jit(jax.grad(loss(single)))(x), jax.jit(jax.grad(loss(par)))(x)
    for n in x:
        _close(g2[n], g1[n], f"{op} d{n}")


def _close(a, b, what):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
        assert_close(x, y, TOL, f"{what}[{i}]")


def test_layers_on_a_seq_mesh_equal_unsharded():
    """The KDA (short-conv halo, matrix shard map), RWKV-7 (token-shift halo), Mamba-3 MIMO (the
    trapezoid's halo, the SISO op's form over the sub-steps; SISO: the op test above),
    log-linear Mamba-2 (level states, positions from the global ids) and log-linear Gated
    DeltaNet (the summed state's exchange, then the levels') layers in one model on seq=4,
    packed documents: the logits equal the unsharded ones."""
    from flax import nnx

    from linear_jax.models import LM, LMConfig
    from linear_jax.parallel import SeqParallel

    cfg = LMConfig(vocab_size=32, d_model=32, num_layers=5, num_heads=2,
                   layers=("kda", "rwkv7", "mamba3", "log_linear_mamba2",
                           "log_linear_gated_deltanet"),
                   chunk_size=8, init_std=0.1,
                   mixer_options={"rwkv7": {"decay_rank": 8, "a_rank": 8, "gate_rank": 8},
                                  "mamba3": {"mimo_rank": 2},
                                  "log_linear_mamba2": {"num_levels": 4},
                                  "log_linear_gated_deltanet": {"num_levels": 4}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    mesh = _compat.make_mesh((4,), ("seq",), jax.devices()[:4])
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, 32)
    seg = packed_segments(2, T)
    run = lambda sp: jax.jit(lambda m, t, s: m(t, segment_ids=s, seq_parallel=sp)[0])(
        model, tokens, seg)
    assert_close(run(SeqParallel(mesh)), run(None), TOL, "logits")


LAYERS = {
    # Qwen3-Next's: output gate and q/k norms per token, GQA, partial RoPE
    "gated_attention": lambda r: layers.GatedAttention(32, 4, num_kv_heads=2, head_dim=8,
                                                       rotary_dim=4, rngs=r),
    # latents gathered; a low-rank q; n + r != d_v (padded head dims)
    "mla": lambda r: layers.MLA(32, 4, q_rank=16, kv_rank=12, nope_dim=8, rope_dim=4, v_dim=6,
                                rngs=r),
    "hgrn": lambda r: layers.HGRN(32, 4, lower_bound=0.2, chunk_size=C, rngs=r),
    # short-conv halo; the unnormalised first token of a document starting on a boundary
    "rglru": lambda r: layers.RGLRU(32, 4, chunk_size=C, rngs=r),
}
CASES = [("gated_attention", "contiguous"), ("mla", "contiguous"), ("mla", "zigzag"),
         ("hgrn", "contiguous"), ("rglru", "contiguous")]


@pytest.mark.parametrize("name,layout", CASES)
def test_layer_on_a_seq_mesh_equals_unsharded(name, layout):
    """A layer on seq=4 with packed documents (a reset on a shard boundary, one inside): the
    output and the gradients of every parameter and of the input equal the unsharded layer's."""
    from flax import nnx

    from linear_jax.parallel import SeqParallel

    graphdef, params = nnx.split(LAYERS[name](nnx.Rngs(0)))
    mesh = _compat.make_mesh((4,), ("seq",), jax.devices()[:4])
    x = jax.random.normal(jax.random.key(0), (2, T, 32), jnp.float32)
    seg = packed_segments(2, T)
    w = jnp.sin(jnp.arange(32, dtype=jnp.float32) + 1.0)

    def run(seq_parallel):
        def loss(p, x):
            y, _ = nnx.merge(graphdef, p)(x, segment_ids=seg, seq_parallel=seq_parallel)
            return jnp.sum(y * w), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (_, y1), g1 = run(None)
    (_, y2), g2 = run(SeqParallel(mesh, attention_layout=layout))
    assert_close(y2, y1, TOL, "output")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g1),
                            strict=True):
        assert_close(a, b, TOL, f"gradient {jax.tree_util.keystr(path)}")
