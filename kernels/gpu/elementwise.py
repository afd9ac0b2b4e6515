"""Pallas GPU kernel of the element-wise linear recurrence behind `hgrn` and `diagonal_scan`.

    h_t = a_t * h_{t-1} + x_t,          h_{-1} = h0,     output h_t,  final state h_{T-1}

with a_t = exp(g_t) for `hgrn` (log-space gate, exponentiated in the kernel) and a_t as given for
`diagonal_scan` (any sign; complex a, x, h0 run as two float32 planes, below). A packed-document
reset before step t (`chunking.resets`) is a_t -> 0, exactly "the state is zeroed before t".

Backward (`jax.custom_vjp`), with dy_t the cotangent of the output and dh_T of the final state:

    dh_t = dy_t + a_{t+1} dh_{t+1},     dh_{T-1} = dy_{T-1} + dh_T   (lam carries a_{t+1} dh_{t+1})
    dx_t = dh_t,    da_t = dh_t * h_{t-1},    dg_t = da_t * a_t (= dh_t a_t h_{t-1}),
    d h0 = a_0 dh_0

and da_t = 0 where the state resets (a_t was masked to 0 there). h_{t-1} is the forward output read
back (it is the op's output anyway: no recomputation, no extra residual; bf16 outputs give bf16
h_{t-1} in da, an error of the output's own rounding).

Complex (diagonal_scan with complex a, x or h0): with a = ar + i ai etc. the step is

    hr' = ar hr - ai hi + xr,     hi' = ar hi + ai hr + xi

and its transpose, per step, lam = conj(a) dh, dar = dhr hr_{t-1} + dhi hi_{t-1},
dai = dhi hr_{t-1} - dhr hi_{t-1}. The planes are split and rejoined in XLA (real / imag /
lax.complex), whose autodiff gives JAX's complex-gradient convention on top of the real VJP.

Layout and schedule: the public [B, T, D] is read in place. Grid (B, D / BD): each program owns BD
channels of one sequence and carries their state in registers through all T steps, one pass over
HBM (forward: read a, x, write h; backward: read a, h, dy, write da, dx). Time runs in chunks of C
steps unrolled in the kernel: every row of a chunk is loaded first, then the C dependent steps run,
each storing its row, so a chunk's loads are in flight together (Triton keeps a thread's loads and
stores in program order; a load-step-store per row would wait a full memory latency per step).
T need not be a multiple of C (the last T % C steps are a static tail) and is never padded; D is
padded to a multiple of BD only when it is not one. State and arithmetic are float32; bf16/fp16
inputs are read as such and the output is written in x's dtype.

Tunables: `linear_jax.kernels.configs.TritonScanConfig` (chunk lengths, channel block, warps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TritonScanConfig
from linear_jax.kernels.gpu.triton import interpret, triton_params
from linear_jax.ops.common.chunking import pad_to, resets

f32 = jnp.float32


def _split(refs, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(refs[i:i + s])
        i += s
    return out


def _row(ref, t):
    return ref[t, :].astype(f32)


def _call(kernel, name, cfg, BD, shape, n_in, seq_dtypes, n_states):
    """A pallas_call over the grid (B, Dp / BD), each program owning BD channels of one sequence:
    inputs n_in = (sequences [B, T, Dp], states [B, Dp]) then the resets [B, T]; outputs sequences
    of `seq_dtypes`, then n_states float32 states."""
    B, T, Dp = shape
    seq = pl.BlockSpec((None, T, BD), lambda b, d: (b, 0, d))
    vec = pl.BlockSpec((None, BD), lambda b, d: (b, d))
    doc = pl.BlockSpec((None, T), lambda b, d: (b, 0))
    return pl.pallas_call(
        kernel,
        grid=(B, Dp // BD),
        in_specs=[seq] * n_in[0] + [vec] * n_in[1] + [doc],
        out_specs=[seq] * len(seq_dtypes) + [vec] * n_states,
        out_shape=[jax.ShapeDtypeStruct(shape, dt) for dt in seq_dtypes]
        + [jax.ShapeDtypeStruct((B, Dp), f32)] * n_states,
        compiler_params=triton_params(cfg, cfg.num_warps(BD), cfg.stages),
        interpret=interpret(cfg),
        name=name,
    )


def _gate(a, log, r):
    """The planes of a_t from the loaded row(s): exp for a log gate, 0 where the state resets."""
    if log:
        a = [jnp.exp(a[0])]
    if r is not None:
        a = [jnp.where(r, 0.0, p) for p in a]
    return a


def _forward(a, x, h0, r, *, log, has_seg, C, BD, cfg):
    """a, x: tuples of P planes [B, T, Dp]; h0: P planes [B, Dp] float32; r [B, T] int32.
    Returns (h: P planes [B, T, Dp] in x's dtypes, hT: P planes [B, Dp] float32)."""
    P = len(a)
    B, T, Dp = x[0].shape
    N, R = T // C, T % C

    def kernel(*refs):
        a_refs, x_refs, h0_refs, (r_ref,), h_refs, hT_refs = _split(refs, (P, P, P, 1, P, P))

        def rows(t0, L, h):
            A = [[_row(ref, t0 + i) for ref in a_refs] for i in range(L)]
            X = [[_row(ref, t0 + i) for ref in x_refs] for i in range(L)]
            rs = [r_ref[t0 + i] != 0 if has_seg else None for i in range(L)]
            for i in range(L):
                ai, xi = _gate(A[i], log, rs[i]), X[i]
                if P == 1:
                    h = [ai[0] * h[0] + xi[0]]
                else:
                    h = [ai[0] * h[0] - ai[1] * h[1] + xi[0], ai[0] * h[1] + ai[1] * h[0] + xi[1]]
                for ref, v in zip(h_refs, h, strict=True):
                    ref[t0 + i, :] = v.astype(ref.dtype)
            return h

        h = [ref[...].astype(f32) for ref in h0_refs]
        if N:
            h = lax.fori_loop(0, N, lambda n, h: rows(n * C, C, h), h)
        if R:
            h = rows(N * C, R, h)
        for ref, v in zip(hT_refs, h, strict=True):
            ref[...] = v

    outs = _call(kernel, "elementwise_scan_fwd", cfg, BD, (B, T, Dp), (2 * P, P),
                 [p.dtype for p in x], P)(*a, *x, *h0, r)
    return tuple(outs[:P]), tuple(outs[P:])


def _backward(a, h, dy, h0, dhT, r, *, log, has_seg, C, BD, cfg, a_dtypes):
    """Reverse scan. a, h, dy: P planes [B, T, Dp]; h0, dhT: P planes [B, Dp] float32.
    Returns (da, dx, dh0): P planes each (da in a's dtypes, dx in h's, dh0 float32)."""
    P = len(a)
    B, T, Dp = h[0].shape
    N, R = T // C, T % C

    def kernel(*refs):
        (a_refs, h_refs, dy_refs, h0_refs, dhT_refs, (r_ref,), da_refs, dx_refs,
         dh0_refs) = _split(refs, (P, P, P, P, P, 1, P, P, P))
        h0 = [ref[...].astype(f32) for ref in h0_refs]

        def rows(t0, L, lam):
            """Steps t0 + L - 1 down to t0; lam = a_{t+1} dh_{t+1} entering, leaving a_t0 dh_t0."""
            A = [[_row(ref, t0 + i) for ref in a_refs] for i in range(L)]
            Y = [[_row(ref, t0 + i) for ref in dy_refs] for i in range(L)]
            Hp = [[_row(ref, t0 + i - 1) for ref in h_refs] for i in range(1, L)]
            if isinstance(t0, int):                   # the static tail
                first = h0 if t0 == 0 else [_row(ref, t0 - 1) for ref in h_refs]
            else:
                first = [jnp.where(t0 == 0, p0, _row(ref, jnp.maximum(t0 - 1, 0)))
                         for p0, ref in zip(h0, h_refs, strict=True)]
            Hp = [first] + Hp
            rs = [r_ref[t0 + i] != 0 if has_seg else None for i in range(L)]
            for i in reversed(range(L)):
                ai, hp = _gate(A[i], log, rs[i]), Hp[i]
                dh = [y + m for y, m in zip(Y[i], lam, strict=True)]
                if P == 1:
                    da = [dh[0] * hp[0]]
                    lam = [ai[0] * dh[0]]
                else:
                    da = [dh[0] * hp[0] + dh[1] * hp[1], dh[1] * hp[0] - dh[0] * hp[1]]
                    lam = [ai[0] * dh[0] + ai[1] * dh[1], ai[0] * dh[1] - ai[1] * dh[0]]
                if log:
                    da = [da[0] * ai[0]]
                if has_seg:
                    da = [jnp.where(rs[i], 0.0, p) for p in da]
                for ref, v in zip(da_refs + dx_refs, da + dh, strict=True):
                    ref[t0 + i, :] = v.astype(ref.dtype)
            return lam

        lam = [ref[...].astype(f32) for ref in dhT_refs]
        if R:
            lam = rows(N * C, R, lam)
        if N:
            lam = lax.fori_loop(0, N, lambda n, lam: rows((N - 1 - n) * C, C, lam), lam)
        for ref, v in zip(dh0_refs, lam, strict=True):
            ref[...] = v

    outs = _call(kernel, "elementwise_scan_bwd", cfg, BD, (B, T, Dp), (3 * P, 2 * P),
                 list(a_dtypes) + [p.dtype for p in h], P)(*a, *h, *dy, *h0, *dhT, r)
    return tuple(outs[:P]), tuple(outs[P:2 * P]), tuple(outs[2 * P:])


@functools.cache
def _core(cfg, log, has_seg, C, C_bwd, BD):
    """custom_vjp of (a planes, x planes, h0 planes, r) -> (h planes, hT planes), D padded."""
    kw = dict(log=log, has_seg=has_seg, BD=BD, cfg=cfg)

    def fwd(a, x, h0, r):
        h, hT = _forward(a, x, h0, r, C=C, **kw)
        return (h, hT), (a, h, h0, r)

    def bwd(res, cts):
        a, h, h0, r = res
        dy, dhT = cts
        da, dx, dh0 = _backward(a, h, dy, h0, dhT, r, C=C_bwd, a_dtypes=[p.dtype for p in a],
                                **kw)
        return da, dx, dh0, None

    f = jax.custom_vjp(lambda *args: fwd(*args)[0])
    f.defvjp(fwd, bwd)
    return f


def scan(a, x, h0, *, log, segment_ids, chunk_size, config=None):
    """The shared entry: a, x tuples of P (1: real, 2: real and imaginary) planes [B, T, D] (float
    dtypes; a is the log gate when `log`), h0: P planes [B, D] or None; config: a TritonScanConfig
    (None: its default for this device). Returns (h planes in x's dtypes, hT planes float32)."""
    cfg = config or TritonScanConfig.default(jax.devices()[0])
    B, T, D = x[0].shape
    BD = cfg.block(B, D)
    Dp = -(-D // BD) * BD
    padd = lambda p: pad_to(p, p.ndim - 1, Dp)
    h0 = (tuple(jnp.zeros((B, Dp), f32) for _ in x) if h0 is None
          else tuple(padd(p.astype(f32)) for p in h0))
    has_seg = segment_ids is not None
    r = resets(segment_ids).astype(jnp.int32) if has_seg else jnp.zeros((B, T), jnp.int32)
    P = len(x)  # complex: two planes per row, half the rows per chunk (registers)
    C = max(1, min(cfg.chunk // P, chunk_size))
    C_bwd = max(1, min(cfg.chunk_bwd // P, chunk_size))
    core = _core(cfg, bool(log), has_seg, C, C_bwd, BD)
    h, hT = core(tuple(map(padd, a)), tuple(map(padd, x)), h0, r)
    if Dp != D:
        h, hT = tuple(p[..., :D] for p in h), tuple(p[..., :D] for p in hT)
    return h, hT


def hgrn(x, g, *, initial_state, segment_ids, chunk_size, config=None):
    """`hgrn`'s impl signature: h_t = exp(g_t) h_{t-1} + x_t. Returns (h in x's dtype, hT f32)."""
    h0 = None if initial_state is None else (initial_state,)
    (h,), (hT,) = scan((g,), (x,), h0, log=True, segment_ids=segment_ids, chunk_size=chunk_size,
                       config=config)
    return h, hT


def diagonal_scan(a, x, *, initial_state, segment_ids, chunk_size, config=None):
    """`diagonal_scan`'s impl signature: h_t = a_t h_{t-1} + x_t, real (float inputs, output in x's
    dtype, state float32) or complex64 (two float32 planes; output and state complex64)."""
    kw = dict(log=False, segment_ids=segment_ids, chunk_size=chunk_size, config=config)
    if not jnp.iscomplexobj(x):
        h0 = None if initial_state is None else (initial_state,)
        (h,), (hT,) = scan((a,), (x,), h0, **kw)
        return h, hT
    planes = lambda z: (jnp.real(z).astype(f32), jnp.imag(z).astype(f32))
    h0 = None if initial_state is None else planes(initial_state)
    (hr, hi), (sr, si) = scan(planes(a), planes(x), h0, **kw)
    return lax.complex(hr, hi), lax.complex(sr, si)
