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
walks T in chunks of C steps (a `fori_loop` over chunks). Under differentiation the forward also
writes the state entering every chunk, [B, T / C, D, N] (one state per C steps, never one per
step). The backward walks the chunks in reverse: it reloads a chunk's entering state, recomputes
the chunk's states, then its cotangents; dB and dC are summed over the block's channels in the
kernel and over blocks in XLA, dA over the batch in XLA. Each chunk takes one of two paths, chosen
at run time (`lax.cond`) from its decays:

Parallel (C >= 16, the smallest Triton dot; every element's span -L_{C-1} <= `span`): with the
chunk's log decays, rebased to their midpoint so that |L| <= span / 2 (every factor e^{+-L} stays
within e^{span / 2}, far from float32's overflow),

    L_t = (sum_{s<=t} dt_s - 1/2 sum_s dt_s) A,   M = 1/2 sum_s dt_s A,   k_t = resets in [0, t]
    a_t h_{t-1} = e^{L_t} (e^M h_enter [k_t = 0] + sum_{s<t, k_s=k_t} e^{-L_s} b_s),   b_s = x_s B_s
    h_t = a_t h_{t-1} + b_t

and in reverse, with q_t = dy_t C_t and lam the carry a_{C} g_{C} from the next chunk,

    a_{t+1} g_{t+1} = e^{-L_t} (sum_{s>t, k_s=k_t} e^{L_s} q_s + [k_t = k_{C-1}] e^{L_{C-1}} lam)
    g_t = q_t + a_{t+1} g_{t+1},    e_t = g_t * a_t h_{t-1},
    a_0 g_0 = e^M (sum_{s: k_s=0} e^{L_s} q_s + [k_{C-1} = 0] e^{L_{C-1}} lam)   (the next carry)

"Same document" (k_s = k_t, k a cumulative count of resets) drops exactly the terms that a reset
between s and t zeroes, so documents need no fallback. The masked sums over s are one [C, C] x
[C, BD N] product each (a 0/1 mask, 3xTF32 on the tensor cores: float32-accurate). A prefix sum
would do for the forward, but the reverse one can only be written total - cumsum (Triton has no
reverse scan), and with terms decaying along s that difference cancels catastrophically; the
masked product sums only the wanted terms, each <= 1 times its input after the exponents
combine. a_t h_{t-1} and a_{t+1} g_{t+1} come out of strictly triangular masks, never as h_t - b_t.

Sequential (otherwise: decays too strong for e^{-L} in float32, C < 16 or `parallel` off): the C
steps one at a time, unrolled (a chunk's row loads are issued before its dependent steps, see
`elementwise.py`), a = exp(dt A) formed per step; the backward recomputes the chunk's C states in
registers, then runs the C reverse steps. Both paths compute the same function. Per (t, d, n) the
parallel one spends two exp2 (e^L, e^{-L}; the sequential one: one forward, two backward) and C
multiply-adds per masked product (one forward, two backward), but no step waits on the previous.

Padding (inside, undone on return; `linear_jax.ops.common.selective.pad_inputs`, shared with the
TPU kernel, which says why zeros are neutral): T to a multiple of C, each group's channels to a
multiple of BD, N to a power of two. Arithmetic and state are float32; bf16 inputs are read as such.

Tunables: `linear_jax.kernels.configs.TritonSelectiveConfig` (its defaults and the H200 timings
behind them are there). A fused kernel that also formed the step size, the D skip and the z gate
(one state vector per state index, "lanes") measured at half this kernel's speed on an H200 and
was removed (benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TritonSelectiveConfig, next_pow2
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params
from linear_jax.ops.common.selective import pad_inputs, scan_vjp, unfused

f32 = jnp.float32
MIN_DOT = 16  # Triton's smallest dot dimension: the parallel path needs C >= 16 and BD * N >= 16
# Decays are formed as exp2(dt A log2 e): exp2 lowers to libdevice's exp2f (one ex2.approx), expf to
# a longer range-reduced sequence, and the exps are most of the per-element work.
LOG2E = 1.4426950408889634


def _rows(refs, t, has_seg):
    """Step t's (dt [BD], x [BD], B [N], C [N]) as float32 and its reset (a bool, or None)."""
    dt_ref, x_ref, b_ref, c_ref, r_ref = refs
    return (dt_ref[t, :].astype(f32), x_ref[t, :].astype(f32), b_ref[t, :].astype(f32),
            c_ref[t, :].astype(f32), r_ref[t] != 0 if has_seg else None)


def _decay(dt, r, A2):
    """a = exp(dt A) [BD, N] from A2 = A log2 e, 0 where a document starts (formed per step: C of
    them would not fit in registers)."""
    a = jnp.exp2(dt[:, None] * A2)
    return a if r is None else jnp.where(r, 0.0, a)


def _use_parallel(cfg, C, BD, Np):
    return cfg.parallel and C >= MIN_DOT and BD * Np >= MIN_DOT


def _mild(dt, A, span):
    """Whether the chunk's every decay span -sum_t dt_t A (dt [C, BD]) is at most `span` (a
    scalar bool, the `lax.cond` predicate)."""
    return jnp.max(-jnp.sum(dt, axis=0)[:, None] * A) <= span


def _blocks(refs, t0, dt, has_seg):
    """The chunk's (dt [C, BD] as given, x [C, BD], B [C, N], C [C, N]) as float32 and its
    document index k [C] (resets in [t0, t0 + i]; None without documents)."""
    _, x_ref, b_ref, c_ref, r_ref = refs
    rows = pl.ds(t0, dt.shape[0])
    k = jnp.cumsum(r_ref[rows], axis=0) if has_seg else None
    return (dt, x_ref[rows, :].astype(f32), b_ref[rows, :].astype(f32), c_ref[rows, :].astype(f32),
            k)


def _logs(dt, A2):
    """From A2 = A log2 e: e^L, e^{-L} [C, BD, N] of the chunk's rebased log decays L (|L| <= span
    / 2), e^M with M the rebase (log decay from the chunk's start to its midpoint), and
    e^{L_{C-1}} [BD, N]."""
    half = 0.5 * jnp.sum(dt, axis=0)                             # [BD]
    L2 = (jnp.cumsum(dt, axis=0) - half[None, :])[:, :, None] * A2[None]
    last = jnp.sum(dt, axis=0) - half
    return (jnp.exp2(L2), jnp.exp2(-L2), jnp.exp2(half[:, None] * A2),
            jnp.exp2(last[:, None] * A2))


def _masks(C, k):
    """[C, C] float 0/1 masks (row t, column s): strictly lower (s < t) and strictly upper (s > t),
    both restricted to s in t's document (k_s = k_t)."""
    t = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    s = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    lo, up = s < t, s > t
    if k is not None:
        same = k[:, None] == k[None, :]
        lo, up = lo & same, up & same
    return jnp.where(lo, 1.0, 0.0).astype(f32), jnp.where(up, 1.0, 0.0).astype(f32)


def _msum(mask, v, interp):
    """out_t = sum_s mask[t, s] v_s for v [C, BD, N]: a [C, C] x [C, BD N] product (exact 0/1
    mask, so 3xTF32 keeps v's float32 accuracy; IEEE float32 in interpret mode `interp`)."""
    C, BD, N = v.shape
    return dot(mask, v.reshape(C, BD * N), split_tf32=True, interpret=interp).reshape(C, BD, N)


def _where_doc(k, value, cond_k):
    """value [C, BD, N] (or broadcastable) where cond_k(k_t) holds, else 0 (all t without docs)."""
    return value if k is None else jnp.where(cond_k(k)[:, None, None], value, 0.0)


def _par_states(blocks, A2, h, interp):
    """The parallel path's states of a chunk entered with h [BD, N]: (a_t h_{t-1}, h_t) [C, BD, N],
    plus (e^L, e^{-L}, e^M, e^{L_{C-1}}, the strictly upper mask) for the backward."""
    dt, x, Bm, _, k = blocks
    C = dt.shape[0]
    E, Einv, eM, eLast = _logs(dt, A2)
    lo, up = _masks(C, k)
    b = x[:, :, None] * Bm[:, None, :]
    carried = _where_doc(k, (eM * h)[None], lambda k: k == 0)
    ha = E * (carried + _msum(lo, Einv * b, interp))
    return ha, ha + b, (E, Einv, eM, eLast, up)


def _last(v):
    """v[C - 1] of v [C, ...] (a masked sum: Triton tensors cannot be indexed)."""
    t = lax.broadcasted_iota(jnp.int32, v.shape, 0)
    return jnp.sum(jnp.where(t == v.shape[0] - 1, v, 0.0), axis=0)


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

    par = _use_parallel(cfg, C, BD, Np)
    interp = interpret(cfg)

    def kernel(dt_ref, x_ref, a_ref, b_ref, c_ref, h0_ref, r_ref, y_ref, hT_ref, *hs_ref):
        A_ = a_ref[...].astype(f32)
        A2 = A_ * LOG2E
        refs = (dt_ref, x_ref, b_ref, c_ref, r_ref)

        def sequential(t0, h, _):
            rows = [_rows(refs, t0 + i, has_seg) for i in range(C)]
            ys = []
            for dti, xi, Bi, Ci, ri in rows:
                h = _decay(dti, ri, A2) * h + xi[:, None] * Bi[None, :]
                ys.append(jnp.sum(h * Ci[None, :], axis=1))
            for i in range(C):
                y_ref[t0 + i, :] = ys[i].astype(y_ref.dtype)
            return h

        def parallel(t0, h, dt):
            blocks = _blocks(refs, t0, dt, has_seg)
            _, hs, _ = _par_states(blocks, A2, h, interp)
            y = jnp.sum(hs * blocks[3][:, None, :], axis=2)
            y_ref[pl.ds(t0, C), :] = y.astype(y_ref.dtype)
            return _last(hs)

        def chunk(n, h):
            t0 = pl.multiple_of(n * C, C)
            if save:
                hs_ref[0][n] = h
            if not par:
                return sequential(t0, h, None)
            # Decided per chunk at run time: e^{-L} is only safe while the chunk's decays are mild.
            dt = dt_ref[pl.ds(t0, C), :].astype(f32)
            return lax.cond(_mild(dt, A_, cfg.span), parallel, sequential, t0, h, dt)

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
        compiler_params=triton_params(cfg, cfg.warps, cfg.stages),
        interpret=interp,
        name="selective_scan_fwd",
    )(dt, x, A, Bm, Cm, h0, r)


def _backward(dt, x, A, Bm, Cm, hs, dy, dhT, r, *, C, BD, has_seg, cfg):
    """Returns (d dt, d x [B, Tp, Dp]; dA per batch [B, Dp, Np]; dB, dC per channel block
    [B, Tp, Dp / BD, Np]; d h0 [B, Dp, Np])."""
    Bsz, Tp, Dp = x.shape
    G, Np = Bm.shape[2:]
    NC, NB = Tp // C, Dp // BD

    par = _use_parallel(cfg, C, BD, Np)
    interp = interpret(cfg)

    def kernel(dt_ref, x_ref, a_ref, b_ref, c_ref, hs_ref, dy_ref, dhT_ref, r_ref,
               ddt_ref, dx_ref, dA_ref, dB_ref, dC_ref, dh0_ref):
        A_ = a_ref[...].astype(f32)
        A2 = A_ * LOG2E
        refs = (dt_ref, x_ref, b_ref, c_ref, r_ref)

        def sequential(t0, c, lam, dA, _):
            rows = [_rows(refs, t0 + i, has_seg) for i in range(C)]
            dys = [dy_ref[t0 + i, :].astype(f32) for i in range(C)]
            hs_c = [hs_ref[c]]                                   # h_{t0-1}, then h_t0 ..
            for dti, xi, Bi, _, ri in rows:
                hs_c.append(_decay(dti, ri, A2) * hs_c[-1] + xi[:, None] * Bi[None, :])
            out = [None] * C
            for i in reversed(range(C)):
                dti, xi, Bi, Ci, ri = rows[i]
                a = _decay(dti, ri, A2)                          # recomputed, not kept
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

        def parallel(t0, c, lam, dA, dt):
            # Ordered so that few [C, BD, N] tiles are live at once (h, w, q die early).
            _, x, Bm, Cm, k = blocks = _blocks(refs, t0, dt, has_seg)
            rows = pl.ds(t0, C)
            dy = dy_ref[rows, :].astype(f32)
            ha, h, (E, Einv, eM, eLast, up) = _par_states(blocks, A2, hs_ref[c], interp)
            dC_ref[rows, :] = jnp.sum(dy[:, :, None] * h, axis=1).astype(dC_ref.dtype)
            q = dy[:, :, None] * Cm[:, None, :]
            w = E * q                                            # e^{L_s} q_s
            wl = eLast * lam                                     # e^{L_{C-1}} lam
            K = None if k is None else jnp.max(k)                # resets in the chunk
            tail = _where_doc(k, wl[None], lambda k: k == K)
            g = q + Einv * (_msum(up, w, interp) + tail)                 # q_t + a_{t+1} g_{t+1}
            first = jnp.sum(_where_doc(k, w, lambda k: k == 0), axis=0)
            lam = eM * (first + (wl if k is None else jnp.where(K == 0, wl, 0.0)))  # a_0 g_0
            dx_ref[rows, :] = jnp.sum(g * Bm[:, None, :], axis=2).astype(dx_ref.dtype)
            dB_ref[rows, :] = jnp.sum(g * x[:, :, None], axis=1).astype(dB_ref.dtype)
            e = g * ha
            ddt_ref[rows, :] = jnp.sum(e * A_[None], axis=2).astype(ddt_ref.dtype)
            return lam, dA + jnp.sum(e * dt[:, :, None], axis=0)

        def chunk(i, carry):
            c = NC - 1 - i
            t0 = pl.multiple_of(c * C, C)
            if not par:
                return sequential(t0, c, *carry, None)
            dt = dt_ref[pl.ds(t0, C), :].astype(f32)              # the forward's choice again
            return lax.cond(_mild(dt, A_, cfg.span), parallel, sequential, t0, c, *carry, dt)

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
        compiler_params=triton_params(cfg, cfg.warps_bwd, cfg.stages),
        interpret=interp,
        name="selective_scan_bwd",
    )(dt, x, A, Bm, Cm, hs, dy, dhT, r)


@functools.cache
def _core(cfg, has_seg, C, BD):
    """custom_vjp of the padded (dt, x, A, Bm, Cm, h0, r) -> (y, hT)."""
    kw = dict(C=C, BD=BD, has_seg=has_seg, cfg=cfg)
    return scan_vjp(functools.partial(_forward, **kw), functools.partial(_backward, **kw),
                    group_axis=2)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, initial_state,
                   segment_ids, chunk_size, config=None):
    """The op's impl signature (`linear_jax.ops.common.selective.unfused` says it): this module's
    scan with the step size, D and z in XLA."""
    return unfused(functools.partial(scan, config=config))(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=initial_state,
        segment_ids=segment_ids, chunk_size=chunk_size)


def scan(dt, x, A, Bm, Cm, *, initial_state, segment_ids, chunk_size, config=None):
    """dt, x = dt * u [B, T, D]; A [D, N]; Bm, Cm [B, T, G, N]; initial_state [B, D, N] or None;
    config: a TritonSelectiveConfig (None: its default for this device). Returns (y [B, T, D] in
    x's dtype, final state [B, D, N] float32)."""
    cfg = config or TritonSelectiveConfig.default(jax.devices()[0])
    Bsz, T, D = x.shape
    G, N = Bm.shape[2:]
    BD = cfg.block(Bsz, G, D // G)
    C = max(1, min(cfg.chunk, chunk_size))
    Tp = -(-T // C) * C
    (dt, x, A, Bm, Cm, h0, r), unpad = pad_inputs(
        dt, x, A, Bm, Cm, initial_state, segment_ids, Tp=Tp, Dgp=-(-(D // G) // BD) * BD,
        Np=next_pow2(N, 1))
    has_seg = r is not None
    r = r.astype(jnp.int32) if has_seg else jnp.zeros((Bsz, Tp), jnp.int32)
    return unpad(*_core(cfg, has_seg, C, BD)(dt, x, A, Bm, Cm, h0, r))
