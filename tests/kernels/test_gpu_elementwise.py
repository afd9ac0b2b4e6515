"""The GPU element-wise scan kernel (`hgrn` / `diagonal_scan`, `impl="pallas"`), in Pallas interpret
mode on CPU, and its lowering to Triton.

Outputs, final states and the gradients of every float input (x, g or a, initial_state) against
the `lax.scan` reference, through both the output and the final state: float32 and bf16, real,
negative and complex transitions, packed documents, T not a multiple of the chunk (and T shorter
than it), D not a multiple of the channel block, gates down to -30. Tiny shapes: interpret mode
is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from linear_jax.kernels import _compat, registry
from linear_jax.kernels.gpu import elementwise
from linear_jax.kernels.gpu.elementwise import ScanConfig

from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.hgrn import hgrn
from tests.utils import TOL, assert_close, log_sigmoid_gates, segments

B, T, D = 2, 37, 40          # D = 40: two channel blocks of 32, the second half padding
F32_TOL = 1e-5


def _ri(z):
    z = np.asarray(z)
    return np.stack([z.real, z.imag]) if np.iscomplexobj(z) else z


def _inputs(rng, op, dtype, t=T, gate_lo=-4.0, state=True):
    f = lambda *s: rng.standard_normal(s)
    if op == "hgrn":
        first = log_sigmoid_gates(rng, (B, t, D), lo=gate_lo)
    elif dtype == jnp.complex64:   # |a| in (0.3, 1), any phase
        phase = rng.uniform(-np.pi, np.pi, (B, t, D))
        first = rng.uniform(0.3, 1.0, (B, t, D)) * np.exp(1j * phase)
    else:                          # negative transitions too
        first = np.tanh(2 * f(B, t, D))
    cplx = dtype == jnp.complex64
    x = f(B, t, D) + (1j * f(B, t, D) if cplx else 0)
    h0 = (f(B, D) + (1j * f(B, D) if cplx else 0)) if state else None
    gdt = jnp.float32 if op == "hgrn" else dtype
    return dict(a=jnp.asarray(first, gdt), x=jnp.asarray(x, dtype),
                h0=None if h0 is None else jnp.asarray(h0, jnp.complex64 if cplx else jnp.float32))


def _check(op, inp, seg, tol, chunk=16):
    t = inp["x"].shape[1]
    rng = np.random.default_rng(1)
    cplx = jnp.iscomplexobj(inp["x"])
    cn = lambda *s: rng.standard_normal(s) + (1j * rng.standard_normal(s) if cplx else 0)
    dy, dS = jnp.asarray(cn(B, t, D)), jnp.asarray(cn(B, D))
    names = [n for n in ("a", "x", "h0") if inp[n] is not None]

    def loss(impl, d):
        a = dict(inp, **d)
        if op == "hgrn":
            h, S = hgrn(a["x"], a["a"], initial_state=a["h0"], segment_ids=seg, chunk_size=chunk,
                        impl=impl)
        else:
            h, S = diagonal_scan(a["a"], a["x"], initial_state=a["h0"], segment_ids=seg,
                                 chunk_size=chunk, impl=impl)
        real = lambda z, w: jnp.sum(jnp.real(z.astype(w.dtype) * jnp.conj(w)))
        return real(h, dy) + real(S, dS), (h, S)

    d = {n: inp[n] for n in names}
    vg = lambda impl: jax.jit(jax.value_and_grad(lambda d: loss(impl, d), has_aux=True))
    (_, (h, S)), grads = vg("pallas")(d)
    up = jnp.complex64 if cplx else jnp.float32
    (_, (rh, rS)), rgrads = vg("recurrent")({n: v.astype(up) for n, v in d.items()})
    assert h.dtype == inp["x"].dtype and S.dtype == (jnp.complex64 if cplx else jnp.float32)
    assert_close(_ri(h), _ri(rh), tol, f"{op} output")
    assert_close(_ri(S), _ri(rS), F32_TOL if tol == F32_TOL else 1e-4, f"{op} final state")
    for n in names:
        assert grads[n].dtype == d[n].dtype, n
        assert_close(_ri(grads[n]), _ri(rgrads[n]), tol, f"{op} d{n}")


@pytest.mark.parametrize("op", ["hgrn", "diagonal_scan"])
def test_float32_with_state_and_documents(op):
    """Chunk 16: two whole chunks and a 5-step tail, resets inside chunks."""
    rng = np.random.default_rng(0)
    _check(op, _inputs(rng, op, jnp.float32), segments(rng, B, T, p=0.08), F32_TOL)


@pytest.mark.parametrize("op", ["hgrn", "diagonal_scan"])
def test_bfloat16(op):
    """bf16 read in place (the state and the arithmetic stay float32), default chunk 64: the
    forward is one 37-step tail, the backward (chunk 32) one chunk and a tail."""
    rng = np.random.default_rng(2)
    _check(op, _inputs(rng, op, jnp.bfloat16), segments(rng, B, T, p=0.08), TOL["bfloat16"],
           chunk=64)


def test_complex_diagonal_scan():
    rng = np.random.default_rng(3)
    _check("diagonal_scan", _inputs(rng, "diagonal_scan", jnp.complex64),
           segments(rng, B, T, p=0.08), F32_TOL)


def test_strong_decay_whole_chunks_no_state():
    """Gates down to about -30 (a underflows towards 0), T a multiple of the chunk, no initial
    state and no documents."""
    rng = np.random.default_rng(4)
    _check("hgrn", _inputs(rng, "hgrn", jnp.float32, t=32, gate_lo=-30.0, state=False), None,
           F32_TOL)


def test_short_sequence():
    """T = 5 < chunk: only the static tail, in both directions."""
    rng = np.random.default_rng(5)
    _check("diagonal_scan", _inputs(rng, "diagonal_scan", jnp.float32, t=5),
           segments(rng, B, 5, p=0.3), F32_TOL)


def test_registry_and_config():
    for op in ("hgrn", "diagonal_scan"):
        assert "pallas" in registry.kernels_for(op)
    cfg = ScanConfig()
    assert cfg.block(2, 40) == 32 and cfg.block(64, 4096) == 128 and cfg.block(8, 2048) == 32
    assert cfg.num_warps(32) == 1 and cfg.num_warps(256) == 8
    with pytest.raises(ValueError, match="block_d"):
        ScanConfig(block_d=48)
    with pytest.raises(ValueError, match="chunk"):
        ScanConfig(chunk=0)


TRITON = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("case", [("hgrn", jnp.bfloat16), ("diagonal_scan", jnp.float32),
                                  ("diagonal_scan", jnp.complex64)],
                         ids=lambda c: f"{c[0]}-{jnp.dtype(c[1]).name}")
def test_lowers_to_triton(case):
    """Forward and backward lower through Pallas' Triton path on a CPU host (T = 200: three
    chunks and a tail, not a power of two; D = 96: padded to the channel block)."""
    op, dtype = case
    b, t, d = 2, 200, 96
    sds = jax.ShapeDtypeStruct
    sdt = jnp.complex64 if dtype == jnp.complex64 else jnp.float32
    args = (sds((b, t, d), dtype), sds((b, t, d), dtype), sds((b, d), sdt), sds((b, t), jnp.int32))

    def loss(a, x, h0, seg):
        fn = elementwise.hgrn if op == "hgrn" else elementwise.diagonal_scan
        first, second = (x, a) if op == "hgrn" else (a, x)
        h, S = fn(first, second, initial_state=h0, segment_ids=seg, chunk_size=64)
        return jnp.sum(jnp.abs(h).astype(jnp.float32)) + jnp.sum(jnp.abs(S))

    with _compat.lower_for_gpu():
        exp = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                            platforms=["cuda"],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    text = exp.mlir_module()
    for name in ("elementwise_scan_fwd", "elementwise_scan_bwd"):
        assert f'name = "{name}"' in text, name
    assert "num_warps" in text
