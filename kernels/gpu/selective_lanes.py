"""The fused selective scan (`selective_scan`, impl="pallas", SelectiveConfig.layout "lanes").

One kernel takes the op's own arguments and makes one pass over HBM: per channel d and step t,

    dt = softplus(delta + bias) (or delta + bias),    a_n = exp(dt A[d, n])  (0 at a reset)
    h_n = a_n h_n + dt u B_t[n],      y = (sum_n C_t[n] h_n + D u) * silu(z)

reading u, delta, z, B and C once in their own dtype and writing y once in u's dtype; no float32
copy of dt, dt * u or y goes through HBM (the "tile" layout of `selective.py` takes those from XLA).

Layout: the state of a channel block is N separate [BD] vectors ("lanes", one per state index n,
unrolled in Python), each thread holding its channels' N states in registers. Every per-step
operation is then elementwise on [BD] vectors of one layout: B_t[n] and C_t[n] are scalar loads,
y's sum over n stays within a thread, and no step needs a layout change or a cross-thread
reduction. The forward walks T in chunks of C steps (the C steps' loads issued before their
dependent arithmetic) and, under differentiation, stores the state entering every chunk,
[B, T / C, N, D]. The backward walks the chunks in reverse: it reloads a chunk's entering state,
recomputes the chunk's C states and decays in registers, then runs the C reverse steps,

    dy' = dy silu(z),   dz = dy (y + D u) silu'(z),   g_n = dy' C_t[n] + lam_n
    d(dt u) = sum_n g_n B_t[n],   ddt = sum_n g_n h_{t-1,n} a_n A[d, n] + d(dt u) u,
    lam_n <- a_n g_n,   dA_n += g_n h_{t-1,n} a_n dt,   dB_t[n] = sum_d g_n dt u,
    dC_t[n] = sum_d dy' h_{t,n},   du = d(dt u) dt + dy' D,   ddelta = ddt sigmoid(delta + bias)

(sigmoid only with softplus). dB and dC are summed over the block's channels in the kernel (two
reductions per state index and step: the backward's only cross-thread work) and over blocks in
XLA; dA, dD and d bias over the batch in XLA. Padding: T to a multiple of C (dt forced to 0 on the
padded steps, so the state passes through), each group's channels to a multiple of BD; N is not
padded for the arithmetic (lanes are unrolled), only in B / C's blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from linear_jax.kernels._compat import interpret, pl, triton_params
from linear_jax.kernels.gpu.common import next_pow2

from linear_jax.ops.common.chunking import pad_groups, pad_to, resets, unpad_groups

f32 = jnp.float32
LOG2E = 1.4426950408889634


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _step_size(dl, bias, softplus):
    x = dl + bias
    # softplus(x) = x + log1p(exp(-x)) for x > 0: no overflow, and exact where exp(x) would be
    return jnp.where(x > 0, x + jnp.log1p(jnp.exp(-x)), jnp.log1p(jnp.exp(x))) if softplus else x


@dataclasses.dataclass(frozen=True)
class _S:
    """The static facts of one call (hashable: the `functools.cache` key of `_core`)."""

    T: int
    C: int
    BD: int
    N: int
    softplus: bool
    has_z: bool
    has_seg: bool
    warps: int
    warps_bwd: int


def _load(s, refs, t, dy_ref=None):
    """Step t's row: dict of float32 [BD] vectors (u, dl, z, dy), scalars b[n], c[n], the reset and
    whether t is a real step."""
    u_ref, dl_ref, b_ref, c_ref, r_ref, z_ref = refs
    row = dict(u=u_ref[t, :].astype(f32), dl=dl_ref[t, :].astype(f32),
               b=[b_ref[t, n].astype(f32) for n in range(s.N)],
               c=[c_ref[t, n].astype(f32) for n in range(s.N)],
               r=r_ref[t] != 0 if s.has_seg else None, real=t < s.T)
    if s.has_z:
        row["z"] = z_ref[t, :].astype(f32)
    if dy_ref is not None:
        row["dy"] = dy_ref[t, :].astype(f32)
    return row


def _advance(s, row, A2, bias, mask_pad, h):
    """One forward step from the lanes h: (dt, dt * u, decays a, new lanes, y before D / z)."""
    dt = _step_size(row["dl"], bias, s.softplus)
    if mask_pad:
        dt = jnp.where(row["real"], dt, 0.0)
    dtu = dt * row["u"]
    a, h_new, y = [], [], None
    for n in range(s.N):
        an = jnp.exp2(dt * A2[n])
        if s.has_seg:
            an = jnp.where(row["r"], 0.0, an)
        hn = an * h[n] + dtu * row["b"][n]
        a.append(an)
        h_new.append(hn)
        y = hn * row["c"][n] if y is None else y + hn * row["c"][n]
    return dt, dtu, a, h_new, y


def _common_refs(s, refs):
    """Splits the kernel's leading input refs: (u, dl, At, B, C, Dv, bias, h0, r[, z])."""
    u_ref, dl_ref, at_ref, b_ref, c_ref, dv_ref, bias_ref, h0_ref, r_ref = refs[:9]
    z_ref = refs[9] if s.has_z else None
    rest = refs[10:] if s.has_z else refs[9:]
    A2 = [at_ref[n, :] * LOG2E for n in range(s.N)]
    return (u_ref, dl_ref, b_ref, c_ref, r_ref, z_ref), A2, dv_ref[...], bias_ref[...], h0_ref, \
        rest


def _specs(s, Tp, Np, per_group):
    seq = pl.BlockSpec((None, Tp, s.BD), lambda b, j: (b, 0, j))
    grp = pl.BlockSpec((None, Tp, None, Np), lambda b, j: (b, 0, j // per_group, 0))
    lanes = pl.BlockSpec((None, Np, s.BD), lambda b, j: (b, 0, j))
    chan = pl.BlockSpec((s.BD,), lambda b, j: (j,))
    return seq, grp, pl.BlockSpec((Np, s.BD), lambda b, j: (0, j)), chan, lanes, \
        pl.BlockSpec((None, Tp), lambda b, j: (b, 0))


def _forward(s, u, dl, At, Bm, Cm, Dv, bias, h0, r, *z, save):
    """y [B, Tp, Dp] in u's dtype, hT [B, Np, Dp] and with `save` the chunks' entering states
    [B, NC, Np, Dp] (float32)."""
    Bsz, Tp, Dp = u.shape
    G, Np = Bm.shape[2:]
    C, NC = s.C, Tp // s.C
    mask_pad = Tp != s.T

    def kernel(*refs):
        io, A2, Dv_, bias_, h0_ref, out = _common_refs(s, refs)
        y_ref, hT_ref = out[:2]

        def chunk(c, h):
            t0 = c * C
            if save:
                for n in range(s.N):
                    out[2][c, n, :] = h[n]
            rows = [_load(s, io, t0 + i) for i in range(C)]
            ys = []
            for row in rows:
                _, _, _, h, y = _advance(s, row, A2, bias_, mask_pad, h)
                y = y + Dv_ * row["u"]
                if s.has_z:
                    y = y * row["z"] * _sigmoid(row["z"])
                ys.append(y)
            for i in range(C):
                y_ref[t0 + i, :] = ys[i].astype(y_ref.dtype)
            return tuple(h)

        h = lax.fori_loop(0, NC, chunk, tuple(h0_ref[n, :] for n in range(s.N)))
        for n in range(s.N):
            hT_ref[n, :] = h[n]
        for n in range(s.N, Np):
            hT_ref[n, :] = jnp.zeros((s.BD,), f32)

    seq, grp, at, chan, lanes, doc = _specs(s, Tp, Np, Dp // s.BD // G)
    out_specs = [seq, lanes]
    out_shape = [jax.ShapeDtypeStruct((Bsz, Tp, Dp), u.dtype),
                 jax.ShapeDtypeStruct((Bsz, Np, Dp), f32)]
    if save:
        out_specs.append(pl.BlockSpec((None, NC, Np, s.BD), lambda b, j: (b, 0, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((Bsz, NC, Np, Dp), f32))
    return pl.pallas_call(
        kernel, grid=(Bsz, Dp // s.BD),
        in_specs=[seq, seq, at, grp, grp, chan, chan, lanes, doc] + [seq] * len(z),
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=triton_params(s.warps, 1), interpret=interpret(),
        name="selective_scan_fused_fwd",
    )(u, dl, At, Bm, Cm, Dv, bias, h0, r, *z)


def _backward(s, u, dl, At, Bm, Cm, Dv, bias, r, z, hs, dy, dhT):
    """(du, ddelta[, dz] [B, Tp, Dp] in the inputs' dtypes; dA [B, Np, Dp]; dB, dC per channel block
    [B, Tp, NB, Np]; dD, dbias [B, Dp]; dh0 [B, Np, Dp]), float32 but du, ddelta, dz."""
    Bsz, Tp, Dp = u.shape
    G, Np = Bm.shape[2:]
    C, NC, NB = s.C, Tp // s.C, Dp // s.BD
    mask_pad = Tp != s.T

    def kernel(*refs):
        io, A2, Dv_, bias_, dhT_ref, rest = _common_refs(s, refs)   # dhT in h0's place
        hs_ref, dy_ref = rest[:2]
        outs = rest[2:]
        du_ref, ddl_ref = outs[:2]
        dz_ref = outs[2] if s.has_z else None
        dA_ref, dB_ref, dC_ref, dD_ref, dbias_ref, dh0_ref = outs[3:] if s.has_z else outs[2:]
        A = [a2 / LOG2E for a2 in A2]
        lane_ids = lax.broadcasted_iota(jnp.int32, (Np,), 0)

        def chunk(i, carry):
            lam, dA, dD, dbias = carry
            lam, dA = list(lam), list(dA)
            c = NC - 1 - i
            t0 = c * C
            rows = [_load(s, io, t0 + k, dy_ref) for k in range(C)]
            h = [hs_ref[c, n, :] for n in range(s.N)]
            steps = []                               # (dt, dt u, a, h_{t-1}, h_t, y) per step
            for row in rows:
                dt, dtu, a, h_new, y = _advance(s, row, A2, bias_, mask_pad, h)
                steps.append((dt, dtu, a, h, h_new, y + Dv_ * row["u"]))
                h = h_new
            outs_t = [None] * C
            for k in reversed(range(C)):
                row = rows[k]
                dt, dtu, a, h_prev, h_t, y = steps[k]
                dy = row["dy"]
                dz = None
                if s.has_z:
                    sz = _sigmoid(row["z"])
                    dz = dy * y * sz * (1.0 + row["z"] * (1.0 - sz))
                    dy = dy * row["z"] * sz
                dD = dD + dy * row["u"]
                d_dtu = jnp.zeros_like(dt)
                ddt = jnp.zeros_like(dt)
                dB_row = jnp.zeros((Np,), f32)
                dC_row = jnp.zeros((Np,), f32)
                for n in range(s.N):
                    g = dy * row["c"][n] + lam[n]
                    dC_row = jnp.where(lane_ids == n, jnp.sum(dy * h_t[n]), dC_row)
                    dB_row = jnp.where(lane_ids == n, jnp.sum(g * dtu), dB_row)
                    d_dtu = d_dtu + g * row["b"][n]
                    e = g * h_prev[n] * a[n]             # d loss / d(dt A[d, n])
                    ddt = ddt + e * A[n]
                    dA[n] = dA[n] + e * dt
                    lam[n] = a[n] * g
                ddt = ddt + d_dtu * row["u"]
                du = d_dtu * dt + dy * Dv_
                if s.softplus:
                    ddt = ddt * _sigmoid(row["dl"] + bias_)
                if mask_pad:
                    ddt = jnp.where(row["real"], ddt, 0.0)
                dbias = dbias + ddt
                outs_t[k] = (du, ddt, dz, dB_row, dC_row)
            for k in range(C):
                du, ddt, dz, dB_row, dC_row = outs_t[k]
                t = t0 + k
                du_ref[t, :] = du.astype(du_ref.dtype)
                ddl_ref[t, :] = ddt.astype(ddl_ref.dtype)
                if s.has_z:
                    dz_ref[t, :] = dz.astype(dz_ref.dtype)
                dB_ref[t, :] = dB_row
                dC_ref[t, :] = dC_row
            return tuple(lam), tuple(dA), dD, dbias

        zero = jnp.zeros((s.BD,), f32)
        lam, dA, dD, dbias = lax.fori_loop(
            0, NC, chunk, (tuple(dhT_ref[n, :] for n in range(s.N)), (zero,) * s.N, zero, zero))
        for n in range(Np):
            dh0_ref[n, :] = lam[n] if n < s.N else zero
            dA_ref[n, :] = dA[n] if n < s.N else zero
        dD_ref[...] = dD
        dbias_ref[...] = dbias

    seq, grp, at, chan, lanes, doc = _specs(s, Tp, Np, NB // G)
    bchan = pl.BlockSpec((None, s.BD), lambda b, j: (b, j))
    part = pl.BlockSpec((None, Tp, None, Np), lambda b, j: (b, 0, j, 0))
    zs = [z] if s.has_z else []
    sds = jax.ShapeDtypeStruct
    return pl.pallas_call(
        kernel, grid=(Bsz, NB),
        in_specs=[seq, seq, at, grp, grp, chan, chan, lanes, doc] + [seq] * len(zs)
        + [pl.BlockSpec((None, NC, Np, s.BD), lambda b, j: (b, 0, 0, j)), seq],
        out_specs=[seq, seq] + [seq] * len(zs) + [lanes, part, part, bchan, bchan, lanes],
        out_shape=[sds(u.shape, u.dtype), sds(dl.shape, dl.dtype)]
        + [sds(v.shape, v.dtype) for v in zs]
        + [sds((Bsz, Np, Dp), f32), sds((Bsz, Tp, NB, Np), f32), sds((Bsz, Tp, NB, Np), f32),
           sds((Bsz, Dp), f32), sds((Bsz, Dp), f32), sds((Bsz, Np, Dp), f32)],
        compiler_params=triton_params(s.warps_bwd, 1), interpret=interpret(),
        name="selective_scan_fused_bwd",
    )(u, dl, At, Bm, Cm, Dv, bias, dhT, r, *zs, hs, dy)


@functools.cache
def _core(s):
    """custom_vjp of the padded (u, dl, At, Bm, Cm, Dv, bias, h0, r[, z]) -> (y, hT)."""

    def fwd(u, dl, At, Bm, Cm, Dv, bias, h0, r, *z):
        y, hT, hs = _forward(s, u, dl, At, Bm, Cm, Dv, bias, h0, r, *z, save=True)
        return (y, hT), (u, dl, At, Bm, Cm, Dv, bias, r, z, hs)

    def bwd(res, cts):
        u, dl, At, Bm, Cm, Dv, bias, r, z, hs = res
        dy, dhT = cts
        out = _backward(s, u, dl, At, Bm, Cm, Dv, bias, r, z[0] if z else None, hs, dy, dhT)
        du, ddl = out[:2]
        dz = out[2:3] if s.has_z else ()
        dA, dB, dC, dD, dbias, dh0 = out[3:] if s.has_z else out[2:]
        Bsz, Tp, G, Np = Bm.shape
        per_group = lambda d: d.reshape(Bsz, Tp, G, -1, Np).sum(3).astype(Bm.dtype)
        return (du, ddl, dA.sum(0), per_group(dB), per_group(dC), dD.sum(0), dbias.sum(0), dh0,
                None, *dz)

    f = jax.custom_vjp(lambda *a: tuple(_forward(s, *a, save=False)))
    f.defvjp(fwd, bwd)
    return f


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, initial_state,
                   segment_ids, chunk_size, cfg):
    """The op's impl signature (see `linear_jax.ops.selective_scan.unfused`), fused."""
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    Bg = B[:, :, None] if B.ndim == 3 else B
    Cg = C[:, :, None] if C.ndim == 3 else C
    G = Bg.shape[2]
    Dg = Dm // G
    BD = min(cfg.lane_block_d, next_pow2(Dg, 1))
    Dgp, Np = -(-Dg // BD) * BD, next_pow2(N, 1)
    Cs = max(1, min(cfg.lane_chunk, chunk_size))
    Tp = -(-T // Cs) * Cs

    pad = pad_to
    chan = lambda v, axis: pad_groups(v, axis, G, Dgp)
    unchan = lambda v, axis: unpad_groups(v, axis, G, Dg)

    vec = lambda v: chan(jnp.zeros((Dm,), f32) if v is None else v.astype(f32), 0)
    seq = lambda v: pad(chan(v, 2), 1, Tp)
    h0 = jnp.zeros((Bsz, Dm, N), f32) if initial_state is None else initial_state.astype(f32)
    r = (resets(segment_ids).astype(jnp.int32) if segment_ids is not None
         else jnp.zeros((Bsz, T), jnp.int32))
    s = _S(T, Cs, BD, N, bool(delta_softplus), z is not None, segment_ids is not None,
           cfg.lane_warps, cfg.lane_warps_bwd)
    zs = [seq(z)] if z is not None else []
    y, hT = _core(s)(seq(u), seq(delta), pad(chan(A.astype(f32), 0), 1, Np).T,
                     pad(pad(Bg, 1, Tp), 3, Np), pad(pad(Cg, 1, Tp), 3, Np), vec(D),
                     vec(delta_bias), jnp.swapaxes(pad(chan(h0, 1), 2, Np), 1, 2), pad(r, 1, Tp),
                     *zs)
    return unchan(y[:, :T], 2), unchan(jnp.swapaxes(hT, 1, 2)[..., :N], 1)
