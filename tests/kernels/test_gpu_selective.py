"""The GPU selective-scan kernel, called through its entry with a config: what the op contract suite
(`tests/ops/test_contract.py`, the op at the default chunk of 8, where every chunk runs step by
step) does not reach.

In Pallas interpret mode on CPU, against the `lax.scan` reference (outputs, final states and the
gradients of u, delta, A, B, C and the initial state): at chunk 16 the chunk-parallel path and the
sequential fallback, each alone and both in one call, resets inside parallel chunks (at a chunk's
first and last step, two in one chunk); grouped B / C whose groups' channels pad to several channel
blocks each, N padded to a power of two, T padded to the chunk. The config's tile choice
and validation. The Triton lowering of forward and backward (`jax.export` for "cuda" from a CPU
host), with the parallel path and without.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import TritonSelectiveConfig
from linear_jax.kernels.gpu import selective
from linear_jax.ops.selective_scan import selective_scan
from tests.kernels.lowering import export_scan
from tests.utils import assert_close, segments

NAMES = ("u", "delta", "A", "B", "C", "h0")
# chunk 16: the parallel path's smallest; block 16: a group of 20 channels spans two blocks
PARALLEL = TritonSelectiveConfig(chunk=16, block_d=16)
SPAN = PARALLEL.span


def _inputs(rng, Bz, T, D, N, G, scale=0.02):
    """Mild decays (dt = |scale * normal|): every chunk of 16 takes the parallel path."""
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(u=f(Bz, T, D), delta=jnp.asarray(scale * np.abs(rng.standard_normal((Bz, T, D))),
                                                 jnp.float32),
                A=-jnp.exp(f(D, N)), B=f(Bz, T, G, N), C=f(Bz, T, G, N), h0=f(Bz, D, N))


def _spans(x, C):
    """Each chunk's largest decay span -sum_t dt_t A [B, chunks] (dt is delta: no bias, no
    softplus), over all channels: a chunk takes the parallel path iff it is <= span."""
    dt = np.asarray(x["delta"], np.float64)
    Bz, T, D = dt.shape
    dt = np.pad(dt, ((0, 0), (0, -T % C), (0, 0))).reshape(Bz, -1, C, D).sum(2)
    return (dt[..., None] * -np.asarray(x["A"], np.float64)).max(axis=(2, 3))


def _check(x, seg, config=PARALLEL):
    Bz, T, D = x["u"].shape
    rng = np.random.default_rng(1)
    dy = jnp.asarray(rng.standard_normal((Bz, T, D)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal(x["h0"].shape), jnp.float32)

    def loss(impl, d):
        args = (d["u"], d["delta"], d["A"], d["B"], d["C"])
        kw = dict(initial_state=d["h0"], segment_ids=seg)
        if impl == "recurrent":
            y, S = selective_scan(*args, impl="recurrent", **kw)
        else:
            y, S = selective.selective_scan(*args, None, None, None, False, chunk_size=64,
                                            config=config, **kw)
        return jnp.sum(y * dy) + jnp.sum(S * dS), (y, S)

    vg = lambda impl: jax.jit(jax.value_and_grad(lambda d: loss(impl, d), has_aux=True))
    (_, (y, S)), grads = vg("pallas")(x)
    (_, (ry, rS)), rgrads = vg("recurrent")(x)
    assert_close(y, ry, 1e-5, "output")
    assert_close(S, rS, 1e-5, "final state")
    for n in NAMES:
        assert_close(grads[n], rgrads[n], 1e-5, f"d{n}")


def test_parallel_path_grouped_padded_with_resets():
    """Every chunk parallel: G = 2 groups of 20 channels (each padded to two blocks of 16), N = 6
    (padded to 8), T = 45 (padded to 48), an initial state; resets at a chunk's first step
    (t = 16), two in chunk 0, two in chunk 1 of which one on its last step (t = 31), and the second
    sequence's random ones."""
    rng = np.random.default_rng(10)
    x = _inputs(rng, 2, 45, 40, 6, 2)
    assert _spans(x, 16).max() <= SPAN / 4
    seg = segments(rng, 2, 45, p=0.12)
    seg[0] = np.cumsum(np.isin(np.arange(45), [5, 9, 16, 27, 31]))
    _check(x, jnp.asarray(seg.astype(np.int32)))


def test_sequential_fallback_with_documents():
    """Strong decays (dt |A| up to ~50 per step): every chunk's span exceeds `span`, so each runs
    step by step; documents, grouped and padded channels as above."""
    rng = np.random.default_rng(11)
    x = _inputs(rng, 1, 40, 40, 8, 2)
    x["delta"] = jnp.asarray(2.0 + np.abs(rng.standard_normal((1, 40, 40))), jnp.float32)
    assert _spans(x, 16).min() > SPAN
    _check(x, jnp.asarray(segments(rng, 1, 40, p=0.1)))


def test_parallel_and_sequential_chunks_in_one_call():
    """Chunks 0 and 2 mild, 1 and 3 strong (one channel is enough to make a chunk fall back): the
    state crosses between the two kinds both ways, forward and backward. T a multiple of the chunk,
    no documents, no channel padding."""
    rng = np.random.default_rng(12)
    x = _inputs(rng, 2, 64, 32, 8, 1)
    delta = np.asarray(x["delta"]).copy()
    delta[:, 16:32, 5] = 8.0
    delta[:, 48:64, :] += 1.5
    x["delta"] = jnp.asarray(delta)
    spans = _spans(x, 16)
    assert (spans[:, ::2] <= SPAN / 4).all() and (spans[:, 1::2] > SPAN).all(), spans
    _check(x, None)


def test_config_tiles_and_validation():
    cfg = TritonSelectiveConfig()
    # blocks halve while B * G * Dg / BD is below min_programs, down to min_block_d
    assert cfg.block(1, 1, 2048) == 16 and cfg.block(64, 1, 2048) == 32
    assert cfg.block(64, 2, 20) == 16 and cfg.block(1024, 2, 20) == 32 and cfg.block(1, 1, 4) == 4
    assert TritonSelectiveConfig.default(type("Dev", (), {"core_count": 8})()).min_programs == 16
    for bad in (dict(block_d=48), dict(chunk=100), dict(span=100.0), dict(warps_bwd=3),
                dict(interpret=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TritonSelectiveConfig(**bad)


# (dtype, B, T, D, N, G, chunk, documents and initial state)
LOWERING = [(jnp.bfloat16, 4, 4096, 2048, 16, None, 8, False),   # the H200 benchmark's shape
            (jnp.float32, 1, 200, 40, 6, 2, 16, True)]           # padded; the parallel path too


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("case", LOWERING,
                         ids=lambda c: f"{jnp.dtype(c[0]).name}-T{c[2]}-D{c[3]}-chunk{c[6]}")
def test_lowers_to_triton(case, grad):
    """The forward, and under `jax.grad` forward and backward, lower through Pallas' Triton path,
    with every option of the op (D, z, delta_bias, softplus) around the kernel."""
    dtype, Bz, T, D, N, G, chunk, extras = case
    sds = jax.ShapeDtypeStruct
    bc = sds((Bz, T, N) if G is None else (Bz, T, G, N), dtype)
    arrays = [sds((Bz, T, D), dtype), sds((Bz, T, D), dtype), sds((D, N), jnp.float32), bc, bc]
    entry = lambda u, delta, A, B, C, **kw: selective.selective_scan(
        u, delta, A, B, C, A[:, 0], u, A[:, 0], True, **kw)
    text = export_scan(entry, arrays, sds((Bz, D, N), jnp.float32) if extras else None,
                       platform="cuda", grad=grad,
                       config=TritonSelectiveConfig(chunk=chunk, interpret=False))
    assert 'name = "selective_scan_fwd"' in text
    assert ('name = "selective_scan_bwd"' in text) == grad
    assert "num_warps" in text
