"""The TPU selective-scan kernel, called through its entry with a config: what the op contract suite
(`tests/ops/test_contract.py`: one channel block, the op's options around the kernel) does not
reach.

In TPU interpret mode on CPU, against the `lax.scan` reference (outputs, final states and the
gradients of the kernel's dt and dt * u, A, B, C and the initial state): grouped B / C with each
group's channels padded to a lane block, N padded to a sublane multiple, T not a multiple of the
chunk, packed documents; several channel blocks. The config's block choice and validation. The
Mosaic lowering of forward and backward (`jax.export` for "tpu" from a CPU host; Mosaic's own
layout passes run later, in the TPU compiler, and are not exercised).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import TpuConfig, TpuSelectiveConfig
from linear_jax.kernels.tpu import selective as tpu_selective
from linear_jax.ops.selective_scan import selective_scan_recurrent
from tests.kernels.lowering import export_scan
from tests.utils import assert_close, segments

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
    cfg = TpuSelectiveConfig(block_d=case["block_d"], tpu=TpuConfig(chunk=case["chunk"]))

    def loss(fn, d, **kw):
        y, S = fn(d["dt"], d["x"], d["A"], d["B"], d["C"], initial_state=d["h0"],
                  segment_ids=seg, **kw)
        return jnp.sum(y * dy) + jnp.sum(S * dS), (y, S)

    vg = lambda fn, **kw: jax.jit(jax.value_and_grad(lambda d: loss(fn, d, **kw), has_aux=True))
    (_, (y, S)), grads = vg(tpu_selective.scan, chunk_size=64, config=cfg)(x)
    (_, (ry, rS)), rgrads = vg(selective_scan_recurrent)(x)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert_close(y, ry, 1e-5, "y")
    assert_close(S, rS, 1e-5, "final state")
    for n in NAMES:
        assert grads[n].shape == x[n].shape, n
        assert_close(grads[n], rgrads[n], 1e-5, f"d{n}")


def test_config_blocks_and_validation():
    cfg = TpuSelectiveConfig(block_d=512, tpu=TpuConfig(chunk=32))
    # the largest multiple of 128 up to block_d that divides a group's padded channels
    assert cfg.block(384) == 384 and cfg.block(640) == 128 and cfg.block(1024) == 512
    assert cfg.interpret is None and COMPILED.interpret is False
    assert TpuSelectiveConfig.default() == TpuSelectiveConfig()
    with pytest.raises(ValueError, match="block_d"):
        TpuSelectiveConfig(block_d=192)


COMPILED = TpuSelectiveConfig(tpu=TpuConfig(interpret=False))
# (B, T, D, N, G, packed documents + initial state)
LOWERING = [
    (2, 2048, 1024, 16, 1, True),     # Mamba-like: 1024 channels in 256-lane blocks, N = 16
    (1, 1000, 200, 6, 2, False),      # T % chunk != 0; groups of 100 channels and N padded
]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("shape", LOWERING, ids=lambda s: f"T{s[1]}-D{s[2]}-N{s[3]}-G{s[4]}")
def test_lowers_to_mosaic(shape, grad):
    """One Mosaic call for the forward, two (forward, backward) under `jax.grad`, through the op's
    entry (the step size and the D / z options in XLA around the kernel)."""
    B, T, D, N, G, extras = shape
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    entry = lambda u, delta, A, Bm, Cm, **kw: tpu_selective.selective_scan_op(
        u, delta, A, Bm, Cm, A[:, 0], u, A[:, 0], True, **kw)
    text = export_scan(entry, [sd(B, T, D), sd(B, T, D), sd(D, N), sd(B, T, G, N), sd(B, T, G, N)],
                       sd(B, D, N) if extras else None, platform="tpu", grad=grad,
                       config=COMPILED)
    assert len(re.findall(r"tpu_custom_call", text)) == 1 + grad
    assert "selective_scan_fwd" in text
    assert ("selective_scan_bwd" in text) == grad
