"""Mamba's selective scan (`selective_scan`, impl="pallas") as Mosaic TPU kernels, fwd and bwd.

The op hands over dt, x = dt * u [B, T, D], A [D, N], B_, C_ [B, T, G, N] (channel d reads group
d // (D / G)); per channel d the state h_t[d] in R^N runs (the op adds D u and the z gate after)

    a_t = exp(dt_t A)  (0 where a document starts at t),     h_{-1} = h0
    h_t = a_t * h_{t-1} + x_t B_t,          y_t = sum_n C_t[n] h_t[:, n],        final state h_{T-1}

Backward (`jax.custom_vjp`), dy_t the output's cotangent, dh_T the final state's:

    g_t = dy_t C_t + a_{t+1} g_{t+1},      g_{T-1} = dy_{T-1} C_{T-1} + dh_T     (lam = a_t g_t)
    e_t = g_t * h_{t-1} * a_t                                        (= d loss / d(dt_t A))
    d dt_t = sum_n e_t A,     d x_t = sum_n g_t B_t,     d A = sum_{b,t} e_t dt_t,
    d B_t = sum_d g_t x_t,    d C_t = sum_d dy_t h_t,    d h0 = a_0 g_0

Layout: the state of a block of BD channels is [N, BD], N on sublanes, channels on lanes, so every
step is a few full-vreg VPU ops: a = exp(A^T * dt_t) [N, BD], h = a h + B_t x_t (B_t a column
[N, 1], x_t a row [1, BD]), y_t = the sublane sum of C_t h. Blocks: dt, x, y [C, BD] (time on
sublanes), B, C [C, N] (whole N), A^T, h0, states [N, BD]. A step's B_t and C_t rows become columns
by a masked lane sum with the identity (and dB_t, dC_t columns rows by a masked sublane sum): no
transposes. Packed documents enter as a per-batch [T / C, C] table of resets read one row per
chunk.

Grid (B, D / BD, T / C): batch and channel blocks "parallel", chunks "arbitrary" with the [N, BD]
float32 state in VMEM scratch and the C steps of a chunk a `fori_loop`. Under differentiation the
forward also writes the state entering every chunk, [B, T / C, N, D] (one state per C steps, never
one per step). The backward walks the chunks in reverse: it recomputes the chunk's C entering
states from the stored one into VMEM scratch [C, N, BD], then runs the C reverse steps carrying
lam and dA; dB and dC come out per channel block and are summed in XLA, dA per batch.

Padding (inside, undone on return; `linear_jax.ops.common.selective.pad_inputs`, shared with the
GPU kernel, which says why zeros are neutral): T to a multiple of C, every group's channels to a
multiple of 128 and N to a multiple of 8. Everything is float32 (the op casts before calling).

Tunables: `linear_jax.kernels.configs.TpuSelectiveConfig` (channel block; chunk, VMEM limit and
interpret mode in its `tpu` field).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TpuSelectiveConfig
from linear_jax.kernels.tpu import mosaic
from linear_jax.kernels.tpu._layout import round_up
from linear_jax.kernels.tpu.mosaic import F32
from linear_jax.ops.common.selective import pad_inputs, scan_vjp, unfused


@dataclasses.dataclass(frozen=True)
class _Static:
    """A call's static facts (the `functools.cache` key of `_core`): chunk, channel block, whether
    documents are packed, the config."""

    C: int
    BD: int
    has_seg: bool
    cfg: TpuSelectiveConfig


_SQ = mosaic.SQUEEZED


def _eye(Np):
    return lax.broadcasted_iota(jnp.int32, (Np, Np), 0) == lax.broadcasted_iota(
        jnp.int32, (Np, Np), 1)


def _col(row, eye):
    """[1, N] -> [N, 1]."""
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _row(col, eye):
    """[N, 1] -> [1, N]."""
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _step(refs, At, rrow, t, eye):
    """Step t of the chunk: a [N, BD], x_t [1, BD], B_t and C_t columns [N, 1], dt_t [1, BD]."""
    dt_ref, x_ref, b_ref, c_ref = refs
    dt = dt_ref[pl.ds(t, 1), :]
    a = jnp.exp(At * dt)
    if rrow is not None:           # this step's reset, picked from the chunk's row of the table
        lane = lax.broadcasted_iota(jnp.int32, rrow.shape, 1)
        reset = jnp.sum(jnp.where(lane == t, rrow, 0.0), axis=1, keepdims=True) > 0.5   # [1, 1]
        a = jnp.where(reset, 0.0, a)
    return (a, x_ref[pl.ds(t, 1), :], _col(b_ref[pl.ds(t, 1), :], eye),
            _col(c_ref[pl.ds(t, 1), :], eye), dt)


def _fwd_kernel(*refs, s, save):
    dt_ref, x_ref, at_ref, b_ref, c_ref, h0_ref, *rest = refs
    r_ref = rest.pop(0) if s.has_seg else None
    y_ref, hT_ref, *rest = rest
    hs_ref = rest.pop(0) if save else None
    (h_scr,) = rest
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        h_scr[...] = h0_ref[...]

    if save:
        hs_ref[...] = h_scr[...]
    At, eye = at_ref[...], _eye(at_ref.shape[0])
    rrow = r_ref[pl.ds(n, 1), :] if s.has_seg else None

    def step(t, h):
        a, x, Bc, Cc, _ = _step((dt_ref, x_ref, b_ref, c_ref), At, rrow, t, eye)
        h = a * h + Bc * x
        y_ref[pl.ds(t, 1), :] = jnp.sum(Cc * h, axis=0, keepdims=True)
        return h

    h_scr[...] = lax.fori_loop(0, s.C, step, h_scr[...])

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        hT_ref[...] = h_scr[...]


def _bwd_kernel(*refs, s):
    dt_ref, x_ref, at_ref, b_ref, c_ref, hs_ref, dy_ref, dhT_ref, *rest = refs
    r_ref = rest.pop(0) if s.has_seg else None
    ddt_ref, dx_ref, dA_ref, dB_ref, dC_ref, dh0_ref, lam_scr, dA_scr, hc_scr = rest
    m = pl.program_id(2)
    n = pl.num_programs(2) - 1 - m

    @pl.when(m == 0)
    def _():
        lam_scr[...] = dhT_ref[...]
        dA_scr[...] = jnp.zeros_like(dA_scr)

    At, eye = at_ref[...], _eye(at_ref.shape[0])
    rrow = r_ref[pl.ds(n, 1), :] if s.has_seg else None
    seq = (dt_ref, x_ref, b_ref, c_ref)

    def recompute(t, h):             # hc[t] = h_{t-1}, the state step t reads
        hc_scr[t] = h
        a, x, Bc, _, _ = _step(seq, At, rrow, t, eye)
        return a * h + Bc * x

    lax.fori_loop(0, s.C, recompute, hs_ref[...])

    def step(k, carry):
        lam, dA = carry
        t = s.C - 1 - k
        a, x, Bc, Cc, dt = _step(seq, At, rrow, t, eye)
        dy = dy_ref[pl.ds(t, 1), :]
        h_prev = hc_scr[t]
        g = Cc * dy + lam
        e = g * h_prev * a
        ddt_ref[pl.ds(t, 1), :] = jnp.sum(e * At, axis=0, keepdims=True)
        dx_ref[pl.ds(t, 1), :] = jnp.sum(g * Bc, axis=0, keepdims=True)
        dB_ref[pl.ds(t, 1), :] = _row(jnp.sum(g * x, axis=1, keepdims=True), eye)
        dC_ref[pl.ds(t, 1), :] = _row(jnp.sum(dy * (a * h_prev + Bc * x), axis=1,
                                              keepdims=True), eye)
        return a * g, dA + e * dt

    lam, dA = lax.fori_loop(0, s.C, step, (lam_scr[...], dA_scr[...]))
    lam_scr[...] = lam
    dA_scr[...] = dA

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        dA_ref[...] = dA
        dh0_ref[...] = lam


def _specs(s, Np, per_group, Nc, reverse):
    """BlockSpecs over the grid (b, j, n): sequences [B, Tp, Dp], grouped B / C [B, G, Tp, Np],
    A^T [Np, Dp], states [B, Np, Dp], per-chunk states [B, Nc, Np, Dp], resets [B, Nc, C]."""
    C, BD = s.C, s.BD
    c = (lambda n: Nc - 1 - n) if reverse else (lambda n: n)
    seq = pl.BlockSpec((_SQ, C, BD), lambda b, j, n: (b, c(n), j))
    # lax.div (j >= 0): jnp's floor division lowers through `sign`, whose Mosaic rule asks for the
    # TPU generation, so it would not export from a CPU host
    grp = pl.BlockSpec((_SQ, _SQ, C, Np), lambda b, j, n: (b, lax.div(j, per_group), c(n), 0))
    mat = pl.BlockSpec((Np, BD), lambda b, j, n: (0, j))
    state = pl.BlockSpec((_SQ, Np, BD), lambda b, j, n: (b, 0, j))
    chunk_state = pl.BlockSpec((_SQ, _SQ, Np, BD), lambda b, j, n: (b, c(n), 0, j))
    table = pl.BlockSpec((_SQ, Nc, C), lambda b, j, n: (b, 0, 0))
    return seq, grp, mat, state, chunk_state, table


def _call(s, kernel, name, grid, in_specs, out_specs, out_shape, scratch):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch, name=name,
        compiler_params=mosaic.compiler_params(s.cfg.tpu, ("parallel", "parallel", "arbitrary")),
        interpret=mosaic.interpret(s.cfg.tpu))


def _forward(s, dt, x, At, Bg, Cg, h0, r, save):
    Bsz, Tp, Dp = x.shape
    G, Np = Bg.shape[1], Bg.shape[3]
    Nc = Tp // s.C
    seq, grp, mat, state, chunk_state, table = _specs(s, Np, Dp // G // s.BD, Nc, False)
    out_specs = [seq, state] + [chunk_state] * save
    out_shape = [jax.ShapeDtypeStruct((Bsz, Tp, Dp), F32),
                 jax.ShapeDtypeStruct((Bsz, Np, Dp), F32)]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((Bsz, Nc, Np, Dp), F32))
    docs = [r] if s.has_seg else []
    return _call(s, functools.partial(_fwd_kernel, s=s, save=save), "selective_scan_fwd",
                 (Bsz, Dp // s.BD, Nc), [seq, seq, mat, grp, grp, state] + [table] * s.has_seg,
                 out_specs, out_shape, [mosaic.vmem((Np, s.BD))])(
        dt, x, At, Bg, Cg, h0, *docs)


def _backward(s, dt, x, At, Bg, Cg, hs, dy, dhT, r):
    """Returns (d dt, d x [B, Tp, Dp]; dA^T per batch [B, Np, Dp]; dB, dC per channel block
    [B, Dp / BD, Tp, Np]; d h0 [B, Np, Dp])."""
    Bsz, Tp, Dp = x.shape
    G, Np = Bg.shape[1], Bg.shape[3]
    Nc, NB = Tp // s.C, Dp // s.BD
    seq, grp, mat, state, chunk_state, table = _specs(s, Np, NB // G, Nc, True)
    part = pl.BlockSpec((_SQ, _SQ, s.C, Np), lambda b, j, n: (b, j, Nc - 1 - n, 0))
    sds = jax.ShapeDtypeStruct
    docs = [r] if s.has_seg else []
    return _call(
        s, functools.partial(_bwd_kernel, s=s), "selective_scan_bwd", (Bsz, NB, Nc),
        [seq, seq, mat, grp, grp, chunk_state, seq, state] + [table] * s.has_seg,
        [seq, seq, state, part, part, state],
        [sds((Bsz, Tp, Dp), F32), sds((Bsz, Tp, Dp), F32), sds((Bsz, Np, Dp), F32),
         sds((Bsz, NB, Tp, Np), F32), sds((Bsz, NB, Tp, Np), F32), sds((Bsz, Np, Dp), F32)],
        [mosaic.vmem((Np, s.BD)), mosaic.vmem((Np, s.BD)), mosaic.vmem((s.C, Np, s.BD))])(
            dt, x, At, Bg, Cg, hs, dy, dhT, *docs)


@functools.cache
def _core(s):
    """custom_vjp of the padded (dt, x, At, Bg, Cg, h0, r) -> (y, hT)."""
    return scan_vjp(lambda *a, save: _forward(s, *a, save), functools.partial(_backward, s),
                    group_axis=1)


def scan(dt, x, A, Bm, Cm, *, initial_state, segment_ids, chunk_size, config=None):
    """dt, x = dt * u [B, T, D]; A [D, N]; Bm, Cm [B, T, G, N]; initial_state [B, D, N] or None;
    config: a TpuSelectiveConfig (None: its default). Returns (y [B, T, D] in x's dtype, final
    state [B, D, N] float32)."""
    cfg = config or TpuSelectiveConfig.default(jax.devices()[0])
    Bsz, T, D = x.shape
    G, N = Bm.shape[2:]
    Dgp = round_up(D // G, 128)
    C = cfg.tpu.chunk_for(chunk_size, 4)
    Tp = round_up(T, C)
    f32 = lambda v: v.astype(F32)
    (dt, xp, A, Bm, Cm, h0, r), unpad = pad_inputs(
        *map(f32, (dt, x, A, Bm, Cm)), initial_state, segment_ids, Tp=Tp, Dgp=Dgp,
        Np=round_up(N, 8))
    s = _Static(C, cfg.block(Dgp), r is not None, cfg)
    if s.has_seg:
        r = r.astype(F32).reshape(Bsz, Tp // C, C)
    y, hT = _core(s)(dt, xp, A.T, jnp.moveaxis(Bm, 2, 1), jnp.moveaxis(Cm, 2, 1),
                     jnp.swapaxes(h0, 1, 2), r)
    y, hT = unpad(y, jnp.swapaxes(hT, 1, 2))
    return y.astype(x.dtype), hT


def selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kw):
    """The op's impl signature (the registry's entry): the step size, the D skip and the z gate run
    in XLA around `scan`."""
    return unfused(scan)(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kw)
