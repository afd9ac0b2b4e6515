"""The Hopper kernels' numerics on a CPU, in jax's GPU interpreter (`HopperChunkConfig(interpret=
True)`): TMA copies, mbarriers, the warp-specialised pipeline, masks and gate algebra run as on the
device; each wgmma is computed by `jnp.dot` on the same SMEM tiles (the interpreter of jax 0.10
runs no transposed or register-operand wgmma). Against the float32 chunk form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import decay as hopper_decay
from linear_jax.ops import simple_gla

CFG = HopperChunkConfig(interpret=True, grad_programs=3)
f32 = lambda x: x.astype(jnp.float32)
rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))


@pytest.mark.parametrize("strong", [False, True], ids=["gates", "strong-gates"])
def test_simple_gla_matches_chunk_form(strong):
    B, T, H, K, V = 1, 100, 1, 64, 64             # two chunks, the second one padded
    ks = jax.random.split(jax.random.key(3), 7)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    k = (jax.random.normal(ks[1], (B, T, H, K)) / 8).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.bfloat16)
    g = (-20.0 * jax.random.uniform(ks[3], (B, T, H)) if strong else
         jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 4)
    S0 = jax.random.normal(ks[4], (B, H, K, V))
    seg = jnp.asarray((np.arange(T) >= 30) + (np.arange(T) >= 64), jnp.int32)[None]
    do = jax.random.normal(ks[5], (B, T, H, V))
    dS = jax.random.normal(ks[6], (B, H, K, V))

    def loss(fn, *a):
        o, S = fn(*a)
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    kern = lambda q, k, v, g, S0: hopper_decay.simple_gla(
        q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64, config=CFG)
    ref = lambda q, k, v, g, S0: simple_gla(q, k, v, g, scale=K**-0.5, initial_state=S0,
                                            segment_ids=seg, impl="chunk")
    grads, (o, S) = jax.jit(jax.grad(lambda *a: loss(kern, *a), argnums=range(5), has_aux=True))(
        q, k, v, g, S0)
    grads_r, (o_r, S_r) = jax.grad(lambda *a: loss(ref, *a), argnums=range(5), has_aux=True)(
        f32(q), f32(k), f32(v), g, S0)
    assert rel(o, o_r) < 1e-2 and rel(S, S_r) < 1e-2
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_r, strict=True):
        assert not bool(jnp.isnan(f32(a)).any()), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))
