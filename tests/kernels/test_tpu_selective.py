"""The TPU selective-scan kernel (`selective_scan`, impl="pallas" on a TPU) in TPU interpret mode.

Outputs, final states and the gradients of every float input (the kernel's dt and dt * u, A, B, C,
the initial state) against the `lax.scan` reference: grouped B / C with each group's channels
padded to a lane block, N padded to a sublane multiple, T not a multiple of the chunk, packed
documents, an initial state, several channel blocks; and once through the op (the registry's TPU
entry, as on a TPU) with bf16 u, D, z, delta_bias and softplus around the kernel. Tiny shapes:
interpret mode is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from linear_jax.kernels import registry
from linear_jax.kernels.tpu import selective as tpu_selective
from linear_jax.kernels.tpu.config import TpuConfig

from linear_jax.ops.selective_scan import selective_scan, selective_scan_recurrent
from tests.utils import TOL, assert_close, segments

NAMES = ("dt", "x", "A", "B", "C", "h0")


def _inputs(rng, Bz, T, D, N, G):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(dt=jnp.asarray(0.5 * np.abs(rng.standard_normal((Bz, T, D))), jnp.float32),
                x=f(Bz, T, D), A=-jnp.exp(f(D, N)), B=f(Bz, T, G, N), C=f(Bz, T, G, N),
                h0=f(Bz, D, N))


@pytest.mark.parametrize("case", [
    # G = 2 groups of 20 channels (each padded to one 128-lane block), N = 6 (padded to 8),
    # T = 37 in chunks of 16 (padded to 48), documents starting inside chunks, an initial state
    dict(shape=(2, 37, 40, 6, 2), chunk=16, docs=True, block_d=256),
    # one group of 256 channels in two 128-channel blocks, N = 16, T a multiple of the chunk
    dict(shape=(1, 24, 256, 16, 1), chunk=8, docs=False, block_d=128),
], ids=["grouped-padded-docs", "two-blocks"])
def test_matches_recurrent_reference(case):
    rng = np.random.default_rng(0)
    Bz, T, D, N, G = case["shape"]
    x = _inputs(rng, Bz, T, D, N, G)
    seg = jnp.asarray(segments(rng, Bz, T, p=0.08)) if case["docs"] else None
    dy = jnp.asarray(rng.standard_normal((Bz, T, D)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal((Bz, D, N)), jnp.float32)
    cfg = tpu_selective.SelectiveTpuConfig(block_d=case["block_d"])

    def loss(fn, d, **kw):
        y, S = fn(d["dt"], d["x"], d["A"], d["B"], d["C"], initial_state=d["h0"],
                  segment_ids=seg, **kw)
        return jnp.sum(y * dy) + jnp.sum(S * dS), (y, S)

    vg = lambda fn, **kw: jax.jit(jax.value_and_grad(lambda d: loss(fn, d, **kw), has_aux=True))
    (_, (y, S)), grads = vg(tpu_selective.selective_scan, chunk_size=case["chunk"],
                            config=cfg)(x)
    (_, (ry, rS)), rgrads = vg(selective_scan_recurrent)(x)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert_close(y, ry, 1e-5, "y")
    assert_close(S, rS, 1e-5, "final state")
    for n in NAMES:
        assert grads[n].shape == x[n].shape, n
        assert_close(grads[n], rgrads[n], 1e-5, f"d{n}")


def test_through_the_op_with_options(monkeypatch):
    """The registry's TPU entry behind impl="pallas" (as on a TPU): bf16 u and delta, [B, T, N]
    B / C, D, z, delta_bias and softplus in the op around the kernel, T = 21, chunk_size 64."""
    monkeypatch.setattr(registry, "_family", lambda backend: "tpu")
    rng = np.random.default_rng(2)
    Bz, T, D, N = 2, 21, 24, 16
    bf = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
    u, delta, z = bf(Bz, T, D), bf(Bz, T, D), bf(Bz, T, D)
    A = -jnp.exp(jnp.asarray(rng.standard_normal((D, N)), jnp.float32))
    Bm, Cm = bf(Bz, T, N), bf(Bz, T, N)
    h0 = jnp.asarray(rng.standard_normal((Bz, D, N)), jnp.float32)
    opts = dict(D=jnp.ones((D,), jnp.float32), z=z, delta_bias=jnp.full((D,), -1.0, jnp.float32),
                delta_softplus=True, segment_ids=jnp.asarray(segments(rng, Bz, T, p=0.1)))
    dy = jnp.asarray(rng.standard_normal((Bz, T, D)), jnp.float32)

    def loss(impl, args):
        y, S = selective_scan(*args[:5], initial_state=args[5], impl=impl, **opts)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(S), (y, S)

    args = (u, delta, A, Bm, Cm, h0)
    vg = lambda impl: jax.jit(jax.value_and_grad(lambda a: loss(impl, a), has_aux=True))
    (_, (y, S)), grads = vg("pallas")(args)
    (_, (ry, rS)), rgrads = vg("recurrent")(args)
    assert y.dtype == jnp.bfloat16
    assert_close(y, ry, TOL["bfloat16"] / 2, "y")
    assert_close(S, rS, 1e-5, "final state")
    for name, a, b in zip(("u", "delta", "A", "B", "C", "h0"), grads, rgrads, strict=True):
        assert a.dtype == b.dtype, name
        assert_close(a, b, TOL["bfloat16"] / 2, f"d{name}")


def test_config():
    assert "tpu" in registry._KERNELS["selective_scan"]
    cfg = tpu_selective.SelectiveTpuConfig(block_d=512, tpu=TpuConfig(chunk=32))
    assert cfg.block(384) == 384 and cfg.block(640) == 128 and cfg.block(1024) == 512
    with pytest.raises(ValueError, match="block_d"):
        tpu_selective.SelectiveTpuConfig(block_d=192)
