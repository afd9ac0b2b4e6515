"""What the compiled program of `jit(grad(f))` holds, per layer: two all-gathers on the custom-VJP
path (the forward one packs M, N and the segment ends; the backward one gathers D = Q~^T dO), no
reduce-scatter, and no second local forward pass ("saved" mode holds as many sequential loops as
the single-device op's own gradient; "rerun" one more: the local forward run again); log-linear
simple GLA's level states the same two all-gathers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from linear_jax import parallel as sp
from tests.parallel.common import SINGLE, draw

pytestmark = pytest.mark.timeout(300)
P, T, C = 4, 256, 8   # 8 chunks per shard: the chunk scans stay loops in the HLO


def hlo_of_grad(fn, x, seg):
    loss = lambda x: jnp.sum(fn(**x, segment_ids=seg)[0].astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss)).lower(x).compile().as_text()


def count(txt, op):
    return len(re.findall(rf"\b{op}(?:-start)?\(", txt))


@pytest.mark.parametrize("op,other", [("gla", "autodiff"), ("gated_delta_rule", "rerun")])
def test_collectives_and_loops(op, other):
    mesh = sp.make_mesh({"seq": P}, jax.devices()[:P])
    x = draw(op, 1, T)
    seg = jnp.zeros((1, T), jnp.int32)
    single = hlo_of_grad(lambda **a: SINGLE[op](**a, chunk_size=C, impl="chunk"),
                         draw(op, 1, T // P), seg[:, : T // P])
    loops = count(single, "while")
    assert loops >= 2       # the op's own chunk scan and its transpose: the count means something
    run = lambda mode: hlo_of_grad(
        lambda **a: getattr(sp, op)(**a, chunk_size=C, mesh=mesh, mode=mode), x, seg)
    txt = run("saved")
    assert count(txt, "all-gather") == 2
    assert count(txt, "reduce-scatter") == count(txt, "all-reduce") == 0
    assert count(txt, "while") == loops
    txt = run(other)
    if other == "rerun":    # the ordinary backward from S_in runs the local forward again
        assert count(txt, "all-gather") == 2
        assert count(txt, "while") > loops
    else:                   # autodiff transposes the gather into a reduction
        assert count(txt, "all-gather") == 1
        assert count(txt, "all-reduce") + count(txt, "reduce-scatter") >= 1


def test_log_linear_collectives():
    """The level states exchange like simple GLA's state: one all-gather each way."""
    mesh = sp.make_mesh({"seq": P}, jax.devices()[:P])
    x = draw("simple_gla", 1, T)
    x.pop("initial_state")
    x["level_weights"] = jnp.ones((1, T, x["v"].shape[2], 4), jnp.float32)
    txt = hlo_of_grad(lambda **a: sp.log_linear_simple_gla(**a, chunk_size=C, mesh=mesh), x, None)
    assert count(txt, "all-gather") == 2
    assert count(txt, "reduce-scatter") == count(txt, "all-reduce") == 0


def test_mla_gathers_the_latents():
    """MLA moves its latents, not K and V: the compiled step of `jit(grad)` of the layer holds one
    float all-gather, of [c | k_r] (kv_rank + r = 16 per position, against 2 H d = 96 for K, V),
    and its transpose, one reduce-scatter of the same width."""
    from flax import nnx

    from linear_jax.layers import MLA

    graphdef, params = nnx.split(MLA(32, 4, kv_rank=12, nope_dim=8, rope_dim=4, v_dim=8,
                                     rngs=nnx.Rngs(0)))
    seq = sp.SeqParallel(sp.make_mesh({"seq": P}, jax.devices()[:P]))
    x = jnp.ones((2, 32, 32), jnp.float32)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, seq_parallel=seq)[0] ** 2)
    txt = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    gathers = re.findall(r"= f32\[([\d,]+)\]\S* all-gather(?:-start)?\(", txt)
    scatters = re.findall(r"= f32\[([\d,]+)\]\S* reduce-scatter(?:-start)?\(", txt)
    assert gathers == ["2,32,16"] and scatters == ["2,8,16"]
