"""The GPU selective-scan kernels (`selective_scan`, impl="pallas"), interpret mode on CPU.

The fused "lanes" kernel (layout="lanes"): outputs, final state and the gradients of every float
input (u, delta, A, B, C, D, z, delta_bias, the initial state) with softplus, packed documents,
grouped B / C, T not a multiple of the chunk and padded channels; a mutation of its backward (the
decay factor dropped from d(dt A)) fails the first test. The "tile" kernel (the default layout;
the `tile` fixture pins it at chunk 16, where chunks can run in parallel): outputs, final states
and the gradients of u, delta, A, B, C and the initial state against the `lax.scan` reference,
with packed documents, an initial state, grouped B / C, T not a multiple of the chunk and channels
/ state sizes that the kernel pads; the chunk-parallel path and the sequential fallback, alone and
mixed in one call, with resets inside parallel chunks. Both: the Triton lowering of forward and
backward; the benchmark's --quick run. Tiny shapes: interpret mode is slow.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from linear_jax.kernels import _compat, registry
from linear_jax.kernels.gpu import selective

from linear_jax.ops.selective_scan import selective_scan
from tests.utils import TOL, assert_close, segments

TRITON = "__gpu$xla.gpu.triton"
NAMES = ("u", "delta", "A", "B", "C", "h0")


@pytest.fixture
def tile(monkeypatch):
    """The tile layout's kernel (step size, D and z in XLA) at chunk 16 (the parallel path's
    smallest), the module's other defaults."""
    monkeypatch.setattr(selective, "CONFIG",
                        dataclasses.replace(selective.CONFIG, layout="tile", chunk=16))


@pytest.fixture
def lanes(monkeypatch):
    monkeypatch.setattr(selective, "CONFIG", dataclasses.replace(selective.CONFIG, layout="lanes"))


def _inputs(rng, Bz, T, D, N, G, dtype):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    bc = (Bz, T, N) if G is None else (Bz, T, G, N)
    return dict(u=f(Bz, T, D), delta=jnp.asarray(0.5 * np.abs(rng.standard_normal((Bz, T, D))),
                                                 dtype),
                A=-jnp.exp(jnp.asarray(rng.standard_normal((D, N)), jnp.float32)), B=f(*bc),
                C=f(*bc), h0=jnp.asarray(rng.standard_normal((Bz, D, N)), jnp.float32))


def _check(x, seg, tol, chunk, names=NAMES, **opts):
    Bz, T, D = x["u"].shape
    rng = np.random.default_rng(1)
    dy = jnp.asarray(rng.standard_normal((Bz, T, D)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal(x["h0"].shape), jnp.float32)

    def run(impl, d):
        kw = {**opts, **{n: d[n] for n in ("D", "z", "delta_bias") if n in d}}
        return selective_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], initial_state=d["h0"],
                              segment_ids=seg, chunk_size=chunk, impl=impl, **kw)

    def loss(impl, d):
        y, S = run(impl, d)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(S * dS), (y, S)

    vg = lambda impl: jax.jit(jax.value_and_grad(lambda d: loss(impl, d), has_aux=True))
    (_, (y, S)), grads = vg("pallas")(x)
    (_, (ry, rS)), rgrads = vg("recurrent")(x)
    fy, fS = jax.jit(lambda d: run("pallas", d))(x)                # the forward without residuals
    assert y.dtype == x["u"].dtype and S.dtype == jnp.float32
    assert_close(y, ry, tol, "output")
    assert_close(fy, ry, tol, "output (no grad)")
    assert_close(S, rS, 1e-5, "final state")
    assert_close(fS, rS, 1e-5, "final state (no grad)")
    for n in names:
        assert grads[n].dtype == x[n].dtype
        assert_close(grads[n], rgrads[n], tol, f"d{n}")


def test_lanes_float32_grouped_softplus_documents(monkeypatch, lanes):
    """The fused kernel, float32: G = 2 groups of 12 channels (padded to 16), N = 3, T = 21 in
    chunks of 4 (padded to 24), documents starting inside chunks, an initial state, every option
    (D, z, delta_bias, softplus) and the gradients of all of them."""
    monkeypatch.setattr(selective, "CONFIG", dataclasses.replace(selective.CONFIG, lane_chunk=4))
    rng = np.random.default_rng(20)
    x = _inputs(rng, 2, 21, 24, 3, 2, jnp.float32)
    x.update(D=jnp.asarray(rng.standard_normal(24), jnp.float32),
             z=jnp.asarray(rng.standard_normal((2, 21, 24)), jnp.float32),
             delta_bias=jnp.asarray(rng.standard_normal(24), jnp.float32))
    seg = segments(rng, 2, 21, p=0.15)
    seg[0] = np.cumsum(np.isin(np.arange(21), [4, 6, 7, 20]))      # at and inside chunk starts
    _check(x, jnp.asarray(seg.astype(np.int32)), 1e-5, 64,
           names=NAMES + ("D", "z", "delta_bias"), delta_softplus=True)


def test_lanes_bfloat16_no_documents(lanes):
    """The fused kernel on bf16 inputs (read as bf16, arithmetic in float32; the reference runs
    on the same bf16 values), the default lane chunk with T = 13 (padded), no segment ids, D and z
    but no softplus."""
    rng = np.random.default_rng(21)
    x = _inputs(rng, 1, 13, 32, 4, None, jnp.bfloat16)
    x.update(D=jnp.ones((32,), jnp.float32), z=x["u"] * 2)
    _check(x, None, TOL["bfloat16"] / 2, 64, names=NAMES + ("D",))


def test_float32_grouped_with_state_and_documents(tile):
    """G = 2 groups of 20 channels (padded to 32: two channel blocks per group), N = 6 (padded
    to 8), T = 37 in chunks of 8 (padded to 40), documents starting inside chunks."""
    rng = np.random.default_rng(0)
    x = _inputs(rng, 2, 37, 40, 6, 2, jnp.float32)
    _check(x, jnp.asarray(segments(rng, 2, 37, p=0.08)), 1e-5, 8)


def test_bfloat16_ungrouped_with_options(tile):
    """[B, T, N] B / C, bf16 inputs (the reference runs on the same bf16 values), D, z,
    delta_bias and softplus around the kernel, T = 21 with the default chunk_size."""
    rng = np.random.default_rng(2)
    x = _inputs(rng, 2, 21, 24, 16, None, jnp.bfloat16)
    opts = dict(D=jnp.ones((24,), jnp.float32), z=x["u"] * 2,
                delta_bias=jnp.full((24,), -1.0, jnp.float32), delta_softplus=True)
    _check(x, jnp.asarray(segments(rng, 2, 21, p=0.1)), TOL["bfloat16"] / 2, 64, **opts)


def test_whole_chunks_no_documents_wide_blocks(monkeypatch):
    """T a multiple of C, no segment ids, one 64-channel block (no channel padding)."""
    monkeypatch.setattr(selective, "CONFIG", selective.SelectiveConfig(
        chunk=4, block_d=64, min_block_d=64, layout="tile"))
    rng = np.random.default_rng(3)
    _check(_inputs(rng, 1, 16, 64, 4, None, jnp.float32), None, 1e-5, 64)


def _spans(x, C):
    """Each chunk's largest decay span -sum_t dt_t A [B, chunks] (the kernel's dt is delta here),
    over all channels: a chunk takes the parallel path in every program iff it is <= span."""
    dt = np.asarray(x["delta"], np.float64)
    Bz, T, D = dt.shape
    dt = np.pad(dt, ((0, 0), (0, -T % C), (0, 0))).reshape(Bz, -1, C, D).sum(2)
    return (dt[..., None] * -np.asarray(x["A"], np.float64)).max(axis=(2, 3))


def _mild_inputs(rng, Bz, T, D, N, G, scale=0.02):
    x = _inputs(rng, Bz, T, D, N, G, jnp.float32)
    x["delta"] = jnp.asarray(scale * np.abs(rng.standard_normal((Bz, T, D))), jnp.float32)
    return x


def test_parallel_path_all_chunks(tile):
    """Mild decays: every chunk (C = 16) takes the parallel path; grouped B / C, T = 45 padded to
    48, N = 6 padded to 8, an initial state."""
    rng = np.random.default_rng(10)
    x = _mild_inputs(rng, 2, 45, 32, 6, 2)
    spans = _spans(x, 16)
    assert spans.max() <= selective.CONFIG.span / 4, spans
    _check(x, None, 1e-5, 16)


def test_sequential_fallback_all_chunks(tile):
    """Strong decays (dt |A| up to ~50 per step): every chunk's span exceeds `span`, so each runs
    step by step, with documents."""
    rng = np.random.default_rng(11)
    x = _inputs(rng, 1, 40, 32, 8, None, jnp.float32)
    x["delta"] = jnp.asarray(2.0 + np.abs(rng.standard_normal((1, 40, 32))), jnp.float32)
    assert _spans(x, 16).min() > selective.CONFIG.span
    _check(x, jnp.asarray(segments(rng, 1, 40, p=0.1)), 1e-5, 16)


def test_parallel_and_sequential_chunks_in_one_call(tile):
    """Chunks 0 and 2 mild, chunks 1 and 3 strong (one channel is enough to make a chunk fall
    back): the state crosses between the two kinds both ways, forward and backward."""
    rng = np.random.default_rng(12)
    x = _mild_inputs(rng, 2, 64, 32, 8, None)
    delta = np.asarray(x["delta"]).copy()
    delta[:, 16:32, 5] = 8.0
    delta[:, 48:64, :] += 1.5
    x["delta"] = jnp.asarray(delta)
    spans = _spans(x, 16)
    assert (spans[:, ::2] <= selective.CONFIG.span / 4).all(), spans
    assert (spans[:, 1::2] > selective.CONFIG.span).all(), spans
    _check(x, None, 1e-5, 16)


def test_resets_inside_parallel_chunks(tile):
    """Mild decays with documents: a reset at a chunk's first step (t = 16), two resets in one
    chunk, one in another, a reset on the last step of a chunk (t = 47), and the random ones of
    the second sequence; all chunks parallel."""
    rng = np.random.default_rng(13)
    x = _mild_inputs(rng, 2, 48, 32, 8, None)
    seg = segments(rng, 2, 48, p=0.12)
    seg[0] = np.cumsum(np.isin(np.arange(48), [5, 9, 16, 27, 47]))
    assert _spans(x, 16).max() <= selective.CONFIG.span / 4
    _check(x, jnp.asarray(seg.astype(np.int32)), 1e-5, 16)


def test_registry_and_config():
    assert "pallas" in registry.kernels_for("selective_scan")
    assert selective.SelectiveConfig().block(1, 1, 2048) == 16
    assert selective.SelectiveConfig().block(64, 1, 2048) == 32
    with pytest.raises(ValueError, match="block_d"):
        selective.SelectiveConfig(block_d=48)
    with pytest.raises(ValueError, match="chunk"):
        selective.SelectiveConfig(chunk=100)
    with pytest.raises(ValueError, match="span"):
        selective.SelectiveConfig(span=100.0)
    with pytest.raises(ValueError, match="layout"):
        selective.SelectiveConfig(layout="rows")
    with pytest.raises(ValueError, match="lane_block_d"):
        selective.SelectiveConfig(lane_block_d=24)


@pytest.mark.parametrize("dtype,G,N,layout", [(jnp.bfloat16, None, 16, "lanes"),
                                               (jnp.float32, 2, 6, "lanes"),
                                               (jnp.bfloat16, None, 16, "tile")],
                         ids=["lanes-bf16-N16", "lanes-f32-grouped-N6", "tile-bf16-N16"])
def test_lowers_to_triton(dtype, G, N, layout, monkeypatch):
    monkeypatch.setattr(selective, "CONFIG", dataclasses.replace(selective.CONFIG, layout=layout))
    Bz, T, D = 1, 200, 64
    sds = jax.ShapeDtypeStruct
    bc = sds((Bz, T, N) if G is None else (Bz, T, G, N), dtype)
    args = (sds((Bz, T, D), dtype), sds((Bz, T, D), dtype), sds((D, N), jnp.float32), bc, bc,
            sds((Bz, D, N), jnp.float32), sds((Bz, T), jnp.int32))

    def loss(u, delta, A, B, C, h0, seg):
        y, S = selective_scan(u, delta, A, B, C, D=A[:, 0], z=u, delta_bias=A[:, 0],
                              delta_softplus=True, initial_state=h0, segment_ids=seg,
                              impl="pallas")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(S)

    with _compat.lower_for_gpu():
        exp = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))),
                            platforms=["cuda"],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    text = exp.mlir_module()
    stem = "selective_scan_fused" if layout == "lanes" else "selective_scan"
    for name in (f"{stem}_fwd", f"{stem}_bwd"):
        assert f'name = "{name}"' in text, name
    assert "num_warps" in text


def test_benchmark_quick_runs(tmp_path, monkeypatch):
    from experiments.benchmarks import common, scans_gpu
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    assert scans_gpu.main(["--quick"]) == 0
    assert list(tmp_path.glob("scans_gpu_*.json"))
