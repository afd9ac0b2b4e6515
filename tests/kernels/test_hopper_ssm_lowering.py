"""The Hopper (Mosaic GPU) kernels of the selective scan and of mLSTM lower for CUDA, forward and
backward, checked from a CPU host (`jax.export(..., platforms=["cuda"])` runs the Pallas -> Mosaic
GPU lowering; PTX assembly happens on the device only). Each kernel lowers at a shape without and
one with every optional input. Lowering the kernels is what these tests cost, so no export
repeats another's: a backward export also lowers the forward kernel that saves the residuals,
and the forward alone (nothing saved) is exported once per forward kernel. Only the default
"lane" semantics: the one "warpgroup" export case of the suite is in
tests/kernels/test_hopper_lowering.py (no default config uses it, and its exports here were the
slowest tests of the suite)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from linear_jax.kernels.configs import HopperMlstmConfig, HopperSelectiveConfig
from linear_jax.kernels.gpu.hopper import mlstm as hopper_mlstm
from linear_jax.kernels.gpu.hopper import selective as hopper_selective
from tests.kernels.lowering import cast_round_trips

bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)     # noqa: E731
fs = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)      # noqa: E731

TILE = dict(per_thread_forward=False, per_thread_backward=False)
THREADS = dict(per_thread_forward=True, per_thread_backward=True)
# (semantics, B, T, D, N, G, every optional input (z, D, bias, softplus, h0, segment ids), config,
# exports). A backward export lowers the forward kernel with its saved states too; a forward
# export (the states not saved) is kept once per forward kernel. Chunk 8 outside the default
# config: the lowered kernel unrolls the chunk's steps (and the N state rows), so a chunk of 8
# lowers the same code at half the cost of 16; each kernel keeps one Np = 16 shape.
SELECTIVE = [
    # the tile kernels: the anchor's N, no extras; N = 8, T padded, two groups, every extra
    ("lane", 1, 256, 128, 16, 1, False, dict(chunk=8, **TILE), ("fwd", "bwd")),
    ("lane", 1, 100, 128, 8, 2, True, dict(chunk=8, stages=2, **TILE), ("bwd",)),
    # both per-thread kernels at one channel per thread (128 channels a CTA; the backward without
    # auto barriers): the anchor's N, no extras; every extra with documents, N = 8, T padded, two
    # groups (the per-thread forward and the per-thread backward with extras were two cases, each
    # beside a tile kernel, and a third paired the per-thread forward with the tile backward)
    ("lane", 1, 256, 128, 16, 1, False, dict(chunk=8, **THREADS, thread_channels=128),
     ("fwd", "bwd")),
    ("lane", 1, 100, 256, 8, 2, True, dict(chunk=8, stages=2, **THREADS, thread_channels=128),
     ("bwd",)),
    # both per-thread kernels at 64 and 32 channels a CTA (two and four threads a channel:
    # per-thread loads, stores and shuffles through inline_mgpu): the default config (64, chunk
    # 16, three stages) at the anchor's N; every extra with documents at 32, N padded to 16
    ("lane", 1, 256, 128, 16, 1, False, dict(**THREADS, thread_channels=64), ("fwd", "bwd")),
    ("lane", 1, 100, 128, 12, 2, True, dict(chunk=8, stages=2, **THREADS, thread_channels=32),
     ("fwd", "bwd")),
]


def _export_selective(case, grad):
    sem, B, T, D, N, G, extras, over, _ = case
    cfg = HopperSelectiveConfig(interpret=False, semantics=sem, **over)
    structs = [bf(B, T, D), bf(B, T, D), fs(D, N), fs(B, T, G, N), fs(B, T, G, N)]
    if extras:
        structs += [fs(D), bf(B, T, D), fs(D), fs(B, D, N), jax.ShapeDtypeStruct((B, T), jnp.int32)]
    n_diff = len(structs) - (1 if extras else 0)

    def f(*a):
        u, dl, A, Bm, Cm = a[:5]
        Dv, z, bias, h0, seg = a[5:] if extras else (None,) * 5
        return hopper_selective.selective_scan(u, dl, A, Bm, Cm, Dv, z, bias, extras,
                                               initial_state=h0, segment_ids=seg, chunk_size=64,
                                               config=cfg)

    def loss(*a):
        y, h = f(*a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    fn = jax.grad(loss, argnums=tuple(range(n_diff))) if grad else f
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*structs)


def _selective_id(c):
    return (f"{c[0]}-T{c[2]}-D{c[3]}N{c[4]}G{c[5]}" + "-extras" * c[6]
            + "-threads" * c[7].get("per_thread_forward", False)
            + "-tbwd" * c[7].get("per_thread_backward", False)
            + f"-c{c[7].get('thread_channels', 128)}" * ("thread_channels" in c[7]))


@pytest.mark.parametrize("case,grad", [(c, g == "bwd") for c in SELECTIVE for g in c[8]],
                         ids=[f"{_selective_id(c)}-{g}" for c in SELECTIVE for g in c[8]])
def test_selective_exports_for_cuda(case, grad):
    exp = _export_selective(case, grad)
    text = exp.mlir_module()
    cfg = HopperSelectiveConfig(**case[7])
    assert "mosaic_gpu" in text
    assert text.count("selective_scan_bwd") > 0 if grad else "selective_scan_fwd" in text
    assert ("selective_scan_fwd_threads" in text) == cfg.per_thread_forward
    if grad:
        assert ("selective_scan_bwd_threads" in text) == cfg.per_thread_backward
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


def test_selective_accepts():
    u = jnp.zeros((1, 8, 128), jnp.bfloat16)
    A, Bm = jnp.zeros((128, 16)), jnp.zeros((1, 8, 16))
    assert hopper_selective.accepts(u, u, A, Bm, Bm) is None
    assert "bfloat16" in hopper_selective.accepts(u.astype(jnp.float32), u, A, Bm, Bm)
    assert "multiples of 64" in hopper_selective.accepts(u[..., :96], u, A, Bm, Bm)
    # the per-thread kernels at 128 channels a CTA take channels per group in multiples of 128
    for flag in ("per_thread_forward", "per_thread_backward"):
        cfg = HopperSelectiveConfig(interpret=False, thread_channels=128, **{
            "per_thread_forward": False, "per_thread_backward": False, flag: True})
        with pytest.raises(ValueError, match=f"{flag} takes channels per group"):
            hopper_selective.selective_scan(u[..., :64], u[..., :64], A[:64], Bm, Bm, None,
                                            None, None, True, initial_state=None,
                                            segment_ids=None, chunk_size=64, config=cfg)


# (semantics, B, T, H, K, V, initial state and segment ids, chunk L)
MLSTM = [
    ("lane", 2, 2048, 4, 128, 128, False, 128),     # the anchor tile sizes
    ("lane", 1, 200, 2, 64, 64, True, 256),         # T padded, L = 256 (four key tiles)
    ("lane", 1, 256, 2, 128, 128, True, 64),
]


def _export_mlstm(case, grad, **fields):
    sem, B, T, H, K, V, extras, L = case
    cfg = HopperMlstmConfig(interpret=False, semantics=sem, chunk=L, **fields)
    structs = [bf(B, T, H, K), bf(B, T, H, K), bf(B, T, H, V), fs(B, T, H), fs(B, T, H)]
    if extras:
        structs += [jax.ShapeDtypeStruct((B, T), jnp.int32), fs(B, H, K, V), fs(B, H, K),
                    fs(B, H)]

    def f(q, k, v, i, fg, seg=None, *state):
        return hopper_mlstm.mlstm(q, k, v, i, fg, scale=K**-0.5,
                                  initial_state=tuple(state) if state else None,
                                  segment_ids=seg, chunk_size=64, eps=1e-6, config=cfg)

    def loss(q, k, v, i, fg, seg=None, *state):
        h, (C, n, m) = f(q, k, v, i, fg, seg, *state)
        return jnp.sum(h.astype(jnp.float32)) + jnp.sum(C) + jnp.sum(n)

    argnums = (0, 1, 2, 3, 4) + ((6, 7, 8) if extras else ())
    fn = jax.grad(loss, argnums=argnums) if grad else f
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*structs)


def _mlstm_id(c):
    return f"T{c[2]}-K{c[4]}V{c[5]}-L{c[7]}" + "-h0-docs" * c[6]


# (case, states, grad): each shape's backward (its kernels and the output kernel saving its
# operands), the forward alone (nothing saved) once. states="matmul" (no serial loop in XLA,
# forward or backward; it was a test of its own, exporting the same kernels again at the anchor
# and at L = 256, forward and backward) at the anchor and at L = 256; the serial scan at L = 64
# (every shape had it, forward and backward).
UNFUSED = [(MLSTM[0], "matmul", False), (MLSTM[0], "matmul", True), (MLSTM[1], "matmul", True),
           (MLSTM[2], "scan", True)]


@pytest.mark.parametrize("case,states,grad", UNFUSED,
                         ids=[f"lane-{_mlstm_id(c)}-{s}-{'bwd' if g else 'fwd'}"
                              for c, s, g in UNFUSED])
def test_mlstm_exports_for_cuda(case, states, grad):
    """The unfused kernels (output kernel after the chunk states in XLA); states="matmul": no
    serial loop in XLA."""
    text = _export_mlstm(case, grad, fused_forward=False, states=states).mlir_module()
    names = ("mlstm_out", "mlstm_bwd_queries", "mlstm_bwd_keys") if grad else ("mlstm_out",)
    for name in names:
        assert name in text, name
    assert ("stablehlo.while" in text) == (states == "scan")
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


# (case, states, grad): each shape's backward, with the default states="auto" (the matmul form
# at these few chunks), at L = 256 with "scan" (XLA's VJP of the serial loop; every shape had
# both, over the same kernels); the forward alone once, with "scan": it never forms the chunk
# states, whatever `states` (it was exported at every shape with both, the same program twice;
# the other shapes lower the fused kernel in their backward, with the residuals)
FUSED = [(MLSTM[0], "auto", True), (MLSTM[1], "scan", False), (MLSTM[1], "scan", True),
         (MLSTM[2], "auto", True)]


@pytest.mark.parametrize("case,states,grad", FUSED,
                         ids=[f"{_mlstm_id(c)}-{s}-{'bwd' if g else 'fwd'}" for c, s, g in FUSED])
def test_mlstm_fused_exports_for_cuda(case, states, grad):
    """HopperMlstmConfig(fused_forward=True), the default with states="auto" (the matmul form
    at these few chunks): the forward is the one fused kernel (no unfused output kernel; no
    serial loop in the forward, whatever `states`), the backward the unfused backward kernels on
    its residuals."""
    assert HopperMlstmConfig().fused_forward and HopperMlstmConfig().states == "auto"
    text = _export_mlstm(case, grad, states=states).mlir_module()
    assert "mlstm_fused" in text and "mlstm_out" not in text
    for name in ("mlstm_bwd_queries", "mlstm_bwd_keys") if grad else ():
        assert name in text, name
    assert ("stablehlo.while" in text) == (grad and states == "scan")
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_mlstm_simple_gla_form_exports_for_cuda(grad):
    """HopperMlstmConfig(form="simple_gla"): the simple-GLA kernels (the forward walk, and its
    gradient kernels under grad), none of the mLSTM tile kernels; documents and an initial
    state, T padded."""
    text = _export_mlstm(MLSTM[1], grad, form="simple_gla").mlir_module()
    assert "simple_gla_walk" in text
    assert ("simple_gla_grad" in text) == grad
    assert not any(n in text for n in ("mlstm_fused", "mlstm_out", "mlstm_bwd"))
    # no round-trip check: h's cotangent (the loss's float32 ones, narrowed to h's bf16) widens
    # again for the normaliser, which is float32 XLA here; nothing is split into hi / lo


def test_mlstm_refuses():
    x = jnp.zeros((1, 8, 1, 128), jnp.bfloat16)
    assert hopper_mlstm.accepts(x, x, x) is None
    assert "bfloat16" in hopper_mlstm.accepts(x.astype(jnp.float32), x, x)
    assert "K, V in" in hopper_mlstm.accepts(x[..., :96], x[..., :96], x)
    # the backward's query kernel does not fit SMEM at L = 256 with K = V = 128
    with pytest.raises(ValueError, match="HopperMlstmConfig.chunk"):
        _export_mlstm(("lane", 1, 256, 1, 128, 128, False, 256), grad=True)
    with pytest.raises(ValueError, match="HopperMlstmConfig.states"):
        HopperMlstmConfig(states="loop")
    with pytest.raises(ValueError, match="HopperMlstmConfig.form"):
        HopperMlstmConfig(form="gla")


@pytest.mark.parametrize("chunks,form", [(64, "matmul"), (65, "scan")])
def test_mlstm_auto_states_form(chunks, form):
    """states="auto": the chunk states' matmul form up to MATMUL_CHUNKS chunks (its product
    grows as their square), the serial scan past them."""
    L = 64
    assert HopperMlstmConfig.MATMUL_CHUNKS == 64
    T = chunks * L
    k = jnp.zeros((1, T, 1, 8))
    ip = lf = jnp.zeros((1, T, 1))
    states = hopper_mlstm._states_of(HopperMlstmConfig(states="auto"))
    jaxpr = str(jax.make_jaxpr(lambda k, ip, lf: states(k, k, ip, lf, None, None, T, L))(
        k, ip, lf))
    assert ("scan[" in jaxpr) == (form == "scan")
