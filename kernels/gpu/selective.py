"""Pallas GPU kernel of Mamba's selective scan (`selective_scan`, impl="pallas"), Triton lowering.

The op hands over dt, x = dt * u [B, T, D], A [D, N], B_, C_ [B, T, G, N] (channel d reads group
d // (D / G)), and per channel d the state h_t[d] in R^N runs

    a_t = exp(dt_t A)  (0 where a document starts at t),     h_{-1} = h0
    h_t = a_t * h_{t-1} + x_t B_t,          y_t = sum_n C_t[n] h_t[:, n],        final state h_{T-1}

Backward (`jax.custom_vjp`), with dy_t the output's cotangent and dh_T the final state's:

    g_t = dy_t C_t + a_{t+1} g_{t+1},      g_{T-1} = dy_{T-1} C_{T-1} + dh_T     (lam = a_t g_t)
    e_t = g_t * h_{t-1} * a_t                                        (= d loss / d(dt_t A))
    d dt_t = sum_n e_t A,     d x_t = sum_n g_t B_t,     d A = sum_{b,t} e_t dt_t,
    d B_t = sum_d g_t x_t,    d C_t = sum_d dy_t h_t,    d h0 = a_0 g_0

Schedule: grid (B, channel blocks of BD). Each program keeps its [BD, N] float32 state on chip and
walks T in chunks of C steps (a `fori_loop` over chunks, the C steps unrolled: a chunk's row loads
are issued before its dependent steps, see `elementwise.py`). The forward reads dt, x, B, C once,
fuses the decay exp(dt A), the update and the C-projection, and writes y once. Under
differentiation it also writes the state entering every chunk, [B, T / C, D, N] (one state per C
steps, never one per step). The backward walks the chunks in reverse: it reloads a chunk's entering
state, recomputes the chunk's C states in registers, then runs the C reverse steps; dB and dC are
summed over the block's channels in the kernel and over blocks in XLA, dA over the batch in XLA.

Padding (inside, undone on return): T to a multiple of C with dt = x = 0 (a = 1, no input: the
state passes through); each group's channels to a multiple of BD and N to a power of two with zeros
(a = 1 on a zero state, B = C = 0). Arithmetic and state are float32; bf16 inputs are read as such.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from linear_jax.kernels._compat import interpret, pl, triton_params
from linear_jax.kernels.gpu.common import _pow2, next_pow2

from linear_jax.ops.common.chunking import resets

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SelectiveConfig:
    """Tunables. chunk: C, steps between stored states (capped by the op's chunk_size; the backward
    holds C states [BD, N] in registers). block_d: channels per program, halved (down to
    min_block_d) while the grid has fewer than min_programs programs (the work is sequential in T).
    """

    chunk: int = 16
    block_d: int = 32
    min_block_d: int = 16
    min_programs: int = 264
    warps: int = 4
    warps_bwd: int = 4
    stages: int = 1

    def __post_init__(self):
        for name in ("block_d", "min_block_d"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"SelectiveConfig.{name} must be a power of two, "
                                 f"got {getattr(self, name)}")
        if not 1 <= self.chunk <= 64:
            raise ValueError(f"SelectiveConfig.chunk must be in [1, 64], got {self.chunk}")
        if self.warps not in (1, 2, 4, 8) or self.warps_bwd not in (1, 2, 4, 8):
            raise ValueError("SelectiveConfig.warps, warps_bwd must be 1, 2, 4 or 8")

    def block(self, B: int, G: int, Dg: int) -> int:
        bd = min(self.block_d, next_pow2(Dg, 1))
        while B * G * -(-Dg // bd) < self.min_programs and bd > self.min_block_d:
            bd //= 2
        return bd


CONFIG = SelectiveConfig()


def _rows(refs, t, has_seg):
    """Step t's (dt [BD], x [BD], B [N], C [N]) as float32 and its reset (a bool, or None)."""
    dt_ref, x_ref, b_ref, c_ref, r_ref = refs
    return (dt_ref[t, :].astype(f32), x_ref[t, :].astype(f32), b_ref[t, :].astype(f32),
            c_ref[t, :].astype(f32), r_ref[t] != 0 if has_seg else None)


def _decay(dt, r, A):
    """a = exp(dt A) [BD, N], 0 where a document starts (formed per step: C of them would not
    fit in registers)."""
    a = jnp.exp(dt[:, None] * A)
    return a if r is None else jnp.where(r, 0.0, a)


def _specs(Tp, BD, Np, per_group):
    seq = pl.BlockSpec((None, Tp, BD), lambda b, j: (b, 0, j))
    grp = pl.BlockSpec((None, Tp, None, Np), lambda b, j: (b, 0, j // per_group, 0))
    mat = pl.BlockSpec((BD, Np), lambda b, j: (j, 0))
    state = pl.BlockSpec((None, BD, Np), lambda b, j: (b, j, 0))
    doc = pl.BlockSpec((None, Tp), lambda b, j: (b, 0))
    return seq, grp, mat, state, doc


def _forward(dt, x, A, Bm, Cm, h0, r, *, C, BD, has_seg, save, cfg):
    """Returns (y [B, Tp, Dp] in x's dtype, hT [B, Dp, Np], and when `save` the chunks' entering
    states [B, Tp / C, Dp, Np]), all float32 but y."""
    Bsz, Tp, Dp = x.shape
    G, Np = Bm.shape[2:]
    NC = Tp // C

    def kernel(dt_ref, x_ref, a_ref, b_ref, c_ref, h0_ref, r_ref, y_ref, hT_ref, *hs_ref):
        A_ = a_ref[...].astype(f32)
        refs = (dt_ref, x_ref, b_ref, c_ref, r_ref)

        def chunk(n, h):
            t0 = n * C
            if save:
                hs_ref[0][n] = h
            rows = [_rows(refs, t0 + i, has_seg) for i in range(C)]
            ys = []
            for dti, xi, Bi, Ci, ri in rows:
                h = _decay(dti, ri, A_) * h + xi[:, None] * Bi[None, :]
                ys.append(jnp.sum(h * Ci[None, :], axis=1))
            for i in range(C):
                y_ref[t0 + i, :] = ys[i].astype(y_ref.dtype)
            return h

        hT_ref[...] = lax.fori_loop(0, NC, chunk, h0_ref[...].astype(f32))

    seq, grp, mat, state, doc = _specs(Tp, BD, Np, Dp // G // BD)
    out_specs = [seq, state]
    out_shape = [jax.ShapeDtypeStruct((Bsz, Tp, Dp), x.dtype),
                 jax.ShapeDtypeStruct((Bsz, Dp, Np), f32)]
    if save:
        out_specs.append(pl.BlockSpec((None, NC, BD, Np), lambda b, j: (b, 0, j, 0)))
        out_shape.append(jax.ShapeDtypeStruct((Bsz, NC, Dp, Np), f32))
    return pl.pallas_call(
        kernel,
        grid=(Bsz, Dp // BD),
        in_specs=[seq, seq, mat, grp, grp, state, doc],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_params(cfg.warps, cfg.stages),
        interpret=interpret(),
        name="selective_scan_fwd",
    )(dt, x, A, Bm, Cm, h0, r)


def _backward(dt, x, A, Bm, Cm, hs, dy, dhT, r, *, C, BD, has_seg, cfg):
    """Returns (d dt, d x [B, Tp, Dp]; dA per batch [B, Dp, Np]; dB, dC per channel block
    [B, Tp, Dp / BD, Np]; d h0 [B, Dp, Np])."""
    Bsz, Tp, Dp = x.shape
    G, Np = Bm.shape[2:]
    NC, NB = Tp // C, Dp // BD

    def kernel(dt_ref, x_ref, a_ref, b_ref, c_ref, hs_ref, dy_ref, dhT_ref, r_ref,
               ddt_ref, dx_ref, dA_ref, dB_ref, dC_ref, dh0_ref):
        A_ = a_ref[...].astype(f32)
        refs = (dt_ref, x_ref, b_ref, c_ref, r_ref)

        def chunk(k, carry):
            lam, dA = carry
            t0 = (NC - 1 - k) * C
            rows = [_rows(refs, t0 + i, has_seg) for i in range(C)]
            dys = [dy_ref[t0 + i, :].astype(f32) for i in range(C)]
            hs_c = [hs_ref[NC - 1 - k]]                          # h_{t0-1}, then h_t0 ..
            for dti, xi, Bi, _, ri in rows:
                hs_c.append(_decay(dti, ri, A_) * hs_c[-1] + xi[:, None] * Bi[None, :])
            out = [None] * C
            for i in reversed(range(C)):
                dti, xi, Bi, Ci, ri = rows[i]
                a = _decay(dti, ri, A_)                          # recomputed, not kept
                g = dys[i][:, None] * Ci[None, :] + lam
                e = g * hs_c[i] * a
                dA = dA + e * dti[:, None]
                dC = jnp.sum(dys[i][:, None] * hs_c[i + 1], axis=0)
                out[i] = (jnp.sum(e * A_, axis=1), jnp.sum(g * Bi[None, :], axis=1),
                          jnp.sum(g * xi[:, None], axis=0), dC)     # d dt, d x, d B, d C
                lam = a * g
            for i in range(C):
                for ref, v in zip((ddt_ref, dx_ref, dB_ref, dC_ref), out[i], strict=True):
                    ref[t0 + i, :] = v.astype(ref.dtype)
            return lam, dA

        lam, dA = lax.fori_loop(0, NC, chunk, (dhT_ref[...].astype(f32), jnp.zeros_like(A_)))
        dA_ref[...] = dA
        dh0_ref[...] = lam

    seq, grp, mat, state, doc = _specs(Tp, BD, Np, NB // G)
    part = pl.BlockSpec((None, Tp, None, Np), lambda b, j: (b, 0, j, 0))
    return pl.pallas_call(
        kernel,
        grid=(Bsz, NB),
        in_specs=[seq, seq, mat, grp, grp,
                  pl.BlockSpec((None, NC, BD, Np), lambda b, j: (b, 0, j, 0)), seq, state, doc],
        out_specs=[seq, seq, state, part, part, state],
        out_shape=[jax.ShapeDtypeStruct((Bsz, Tp, Dp), dt.dtype),
                   jax.ShapeDtypeStruct((Bsz, Tp, Dp), x.dtype),
                   jax.ShapeDtypeStruct((Bsz, Dp, Np), f32),
                   jax.ShapeDtypeStruct((Bsz, Tp, NB, Np), f32),
                   jax.ShapeDtypeStruct((Bsz, Tp, NB, Np), f32),
                   jax.ShapeDtypeStruct((Bsz, Dp, Np), f32)],
        compiler_params=triton_params(cfg.warps_bwd, cfg.stages),
        interpret=interpret(),
        name="selective_scan_bwd",
    )(dt, x, A, Bm, Cm, hs, dy, dhT, r)


@functools.cache
def _core(cfg, has_seg, C, BD):
    """custom_vjp of the padded (dt, x, A, Bm, Cm, h0, r) -> (y, hT)."""
    kw = dict(C=C, BD=BD, has_seg=has_seg, cfg=cfg)

    def fwd(dt, x, A, Bm, Cm, h0, r):
        y, hT, hs = _forward(dt, x, A, Bm, Cm, h0, r, save=True, **kw)
        return (y, hT), (dt, x, A, Bm, Cm, hs, r)

    def bwd(res, cts):
        dt, x, A, Bm, Cm, hs, r = res
        dy, dhT = cts
        ddt, dx, dA, dB, dC, dh0 = _backward(dt, x, A, Bm, Cm, hs, dy, dhT, r, **kw)
        Bsz, Tp, G, Np = Bm.shape
        per_group = lambda d: d.reshape(Bsz, Tp, G, -1, Np).sum(3).astype(Bm.dtype)
        return (ddt, dx, dA.sum(0).astype(A.dtype), per_group(dB), per_group(dC), dh0, None)

    f = jax.custom_vjp(lambda *args: tuple(_forward(*args, save=False, **kw)))
    f.defvjp(fwd, bwd)
    return f


def selective_scan(dt, x, A, Bm, Cm, *, initial_state, segment_ids, chunk_size, config=None):
    """The op's impl signature: dt, x = dt * u [B, T, D]; A [D, N]; Bm, Cm [B, T, G, N];
    initial_state [B, D, N] or None. Returns (y [B, T, D] in x's dtype, final state [B, D, N]
    float32)."""
    cfg = config or CONFIG
    Bsz, T, D = x.shape
    G, N = Bm.shape[2:]
    Dg = D // G
    BD = cfg.block(Bsz, G, Dg)
    Dgp, Np = -(-Dg // BD) * BD, next_pow2(N, 1)
    C = max(1, min(cfg.chunk, chunk_size))
    Tp = -(-T // C) * C

    def pad(v, axis, to):                       # zeros at the end of `axis`, up to size `to`
        return jnp.pad(v, [(0, to - s if i == axis else 0) for i, s in enumerate(v.shape)])

    def chan(v, axis):                          # pad every group's channels Dg -> Dgp
        s = v.shape
        v = pad(v.reshape(s[:axis] + (G, Dg) + s[axis + 1:]), axis + 1, Dgp)
        return v.reshape(s[:axis] + (G * Dgp,) + s[axis + 1:])

    def unchan(v, axis):
        s = v.shape
        v = v.reshape(s[:axis] + (G, Dgp) + s[axis + 1:])
        v = lax.slice_in_dim(v, 0, Dg, axis=axis + 1)
        return v.reshape(s[:axis] + (D,) + s[axis + 1:])

    h0 = jnp.zeros((Bsz, D, N), f32) if initial_state is None else initial_state.astype(f32)
    has_seg = segment_ids is not None
    r = (resets(segment_ids).astype(jnp.int32) if has_seg
         else jnp.zeros((Bsz, T), jnp.int32))
    seq = lambda v: pad(chan(v, 2), 1, Tp)
    y, hT = _core(cfg, has_seg, C, BD)(
        seq(dt), seq(x), pad(chan(A, 0), 1, Np), pad(pad(Bm, 1, Tp), 3, Np),
        pad(pad(Cm, 1, Tp), 3, Np), pad(chan(h0, 1), 2, Np), pad(r, 1, Tp))
    return unchan(y[:, :T], 2), unchan(hT[..., :N], 1)
