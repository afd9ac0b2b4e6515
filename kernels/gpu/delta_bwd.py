"""Backward kernels of the delta-rule family (see `delta.py` for the forward and the notation).

Reverse state pass (grid (B*H, V/BV), n = N-1 .. 0, dS_N = cotangent of the final state):

    du_n  = A^T do + k_out dS_n+1,        dS_n = keep exp(G_last) dS_n+1 + q_in^T do - W^T du_n

Then one parallel kernel per chunk (grid (B*H, N)), with T = (I + L)^-1 kept from the forward:

    dA = do u^T,  dW = -du S_n^T,  d(beta v) = T^T du,  d(beta k_in) = T^T dW,
    dT = dW (beta k_in)^T + du (beta v)^T,  dL = -T^T dT T^T (strictly lower, same document),
    dq, dk, dv, dbeta from those, and for the gate every pair matrix P = dX * X (X = A, L) gives
    dG_i += rowsum(P)_i - colsum(P)_i, plus the per-row terms of q_in, k_in, k_out and the decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params

f32 = jnp.float32


def _pairs(doc_ref, n, C, has_seg):
    r = jnp.arange(C, dtype=jnp.int32)
    incl = r[:, None] >= r[None, :]
    ones = jnp.ones((C, 1), f32)
    if not has_seg:
        return incl, ones, ones, None
    in_rows, out_rows, keep, same = common.chunk_masks(doc_ref, n, C, True)
    return (incl & same, jnp.where(in_rows[:, None], ones, 0.0),
            jnp.where(out_rows[:, None], ones, 0.0), keep)


def _decay(keep, G_last):
    """keep * exp(G_last), a float32 scalar (keep: bool or None; G_last None: no gate)."""
    d = jnp.float32(1.0) if G_last is None else jnp.exp(G_last)
    return d if keep is None else jnp.where(keep, d, 0.0)


def _gamma(G, mask):
    if G is None:
        return mask.astype(f32)
    return jnp.exp(jnp.where(mask, G - G.reshape(1, -1), -jnp.inf))


def state_bwd(q, k, do, G, doc, W, dS, *, cfg, gated, has_seg, scale, state_dtype):
    B, Tp, H, Kp = q.shape
    Vp, C = do.shape[-1], cfg.chunk
    N, BV = Tp // C, common.state_tiles(B * H, Kp, Vp, cfg, split_k=False, min_bv=32)[1]
    exact, cd = q.dtype == f32, q.dtype

    def kernel(q_ref, k_ref, do_ref, g_ref, doc_ref, w_ref, ds_ref, dhs_ref, du_ref, dh0_ref):
        def step(i, dS):
            n = N - 1 - i
            dhs_ref[n] = dS.astype(dhs_ref.dtype)
            rows = pl.ds(n * C, C)
            q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
            incl, w_in, w_out, keep = _pairs(doc_ref, n, C, has_seg)
            G = g_ref[rows][:, None] if gated else None
            A = dot(q, k, tb=True, exact=exact) * scale * _gamma(G, incl)
            Gl = g_ref[n * C + C - 1] if gated else None
            decay = _decay(keep, Gl)
            if gated:
                w_in, w_out = w_in * jnp.exp(G), w_out * jnp.exp(Gl - G)
            kout = k.astype(f32) * w_out
            du = dot(A.astype(cd), do, ta=True, exact=exact) + dot(kout, dS, exact=exact)
            du_ref[rows, :] = du.astype(du_ref.dtype)
            qin = q.astype(f32) * (scale * w_in)
            return (decay * dS + dot(qin, do.astype(f32), ta=True, exact=exact)
                    - dot(w_ref[rows, :].astype(f32), du, ta=True, exact=exact))

        dh0_ref[...] = jax.lax.fori_loop(0, N, step, ds_ref[...])

    seq = lambda X, x=None: common.spec(H, Tp, X, x=x)
    return pl.pallas_call(
        kernel, grid=(B * H, Vp // BV),
        in_specs=[seq(Kp), seq(Kp), seq(BV, 0), common.spec(H, Tp), common.doc_spec(H, Tp),
                  seq(Kp), common.state_spec(H, Kp, BV, v=0)],
        out_specs=[common.states_spec(H, N, Kp, BV, v=0), seq(BV, 0),
                   common.state_spec(H, Kp, BV, v=0)],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, Kp, Vp), state_dtype),
                   jax.ShapeDtypeStruct((B, Tp, H, Vp), common.half_dtype(cd)),
                   jax.ShapeDtypeStruct((B, H, Kp, Vp), f32)],
        compiler_params=triton_params(cfg, cfg.warps_state, cfg.stages_state),
        interpret=interpret(cfg), name="delta_state_bwd",
    )(q, k, do, G, doc, W, dS)


def backward(q, k, v, beta, G, doc, hs, dhs, u, du, do, W, Tm, *, cfg, gated, has_seg, scale):
    """dq, dk, dv (input dtypes), dbeta and dG [B,Tp,H] float32, in two parallel kernels: the
    state-side terms tiled over K (`_backward_states`), then the UT transform's backward
    (`_backward_wy`). Two smaller programs instead of one keep the float32 tiles in registers."""
    dq, dk1, dW, dG1 = _backward_states(q, k, G, doc, hs, dhs, u, du, do, cfg=cfg, gated=gated,
                                        has_seg=has_seg, scale=scale)
    dk, dv, dbeta, dG = _backward_wy(k, v, beta, G, doc, Tm, du, dW, dk1, jnp.sum(dG1, axis=0),
                                     cfg=cfg, gated=gated, has_seg=has_seg)
    return dq, dk, dv, dbeta, dG


def _backward_states(q, k, G, doc, hs, dhs, u, du, do, *, cfg, gated, has_seg, scale):
    """Per chunk and K tile kb: dA = do u^T, dq, the k_out and intra parts of dk, dW = -du S_n^T,
    and the gate terms that need no T; grid (B*H, N, Kp/BK)."""
    B, Tp, H, Kp = q.shape
    Vp, C = u.shape[-1], cfg.chunk
    BK, BV = min(cfg.block_k, Kp), common.value_block(Vp, cfg.block_v_out)
    NK, exact, cd = Kp // BK, q.dtype == f32, q.dtype

    def kernel(q_ref, k_ref, g_ref, doc_ref, h_ref, dh_ref, u_ref, du_ref, do_ref,
               dq_ref, dk_ref, dw_ref, dg_ref):
        n, kb = pl.program_id(1), pl.program_id(2)
        r = jnp.arange(C, dtype=jnp.int32)
        kcols = pl.ds(kb * BK, BK)
        q, k = q_ref[...], k_ref[...]
        qb, kbt = q_ref[:, kcols], k_ref[:, kcols]
        incl, w_in, w_out, keep = _pairs(doc_ref, n, C, has_seg)
        G = g_ref[...][:, None] if gated else None
        gam = _gamma(G, incl)
        Gl = g_ref[C - 1] if gated else None
        decay = _decay(keep, Gl)
        if gated:
            w_in, w_out = w_in * jnp.exp(G), w_out * jnp.exp(Gl - G)
        dA = jnp.zeros((C, C), f32)
        dqi, dko, dW = (jnp.zeros((C, BK), f32) for _ in range(3))
        hd = jnp.zeros((BK,), f32)
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            do_b, u_b, du_b = do_ref[:, cols], u_ref[:, cols], du_ref[:, cols]
            h_b, dh_b = h_ref[:, cols], dh_ref[:, cols]
            dA += dot(do_b, u_b, tb=True, exact=exact)
            dqi += dot(do_b, h_b.astype(cd), tb=True, exact=exact)
            dko += dot(u_b, dh_b.astype(cd), tb=True, exact=exact)
            dW -= dot(du_b.astype(f32), h_b.astype(f32), tb=True, exact=exact)
            hd += jnp.sum(h_b.astype(f32) * dh_b.astype(f32), axis=1)
        dA = jnp.where(incl, dA, 0.0)
        dAg = (dA * gam).astype(cd)
        dqin = dqi * w_in                                         # grad of q_in / scale
        dq_ref[...] = ((dot(dAg, kbt, exact=exact) + dqin) * scale).astype(dq_ref.dtype)
        dkout = dko * w_out
        dk_ref[...] = (dot(dAg, qb, ta=True, exact=exact) * scale + dkout).astype(dk_ref.dtype)
        dw_ref[...] = dW.astype(dw_ref.dtype)
        if gated:
            kout_term = jnp.sum(dkout * kbt.astype(f32), axis=1)
            dG = jnp.sum(dqin * qb.astype(f32), axis=1) * scale - kout_term
            dGl = jnp.sum(kout_term) + decay * jnp.sum(hd)
            dG = dG + jnp.where(r == C - 1, dGl, 0.0)
            A = dot(q, k, tb=True, exact=exact) * scale * gam
            PA = dA * A
            pair = jnp.sum(PA, axis=1) - jnp.sum(PA, axis=0)
            dg_ref[...] = dG + jnp.where(kb == 0, pair, 0.0)
        else:
            dg_ref[...] = jnp.zeros((C,), f32)

    rows = lambda X: common.spec(H, C, X, t=0)
    tile = common.spec(H, C, BK, t=0, x=1)
    st = lambda: common.states_spec(H, Tp // C, BK, Vp, n=0, k=1)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C, NK),
        in_specs=[rows(Kp), rows(Kp), common.spec(H, C, t=0), common.doc_spec(H, Tp), st(), st(),
                  rows(Vp), rows(Vp), rows(Vp)],
        out_specs=[tile, tile, tile,
                   pl.BlockSpec((None, None, C, None), lambda bh, n, kb: (kb, bh // H, n, bh % H))],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Kp), q.dtype),
                   jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(cd)),
                   jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(cd)),
                   jax.ShapeDtypeStruct((NK, B, Tp, H), f32)],
        compiler_params=triton_params(cfg, cfg.warps_bwd, cfg.stages_bwd),
        interpret=interpret(cfg), name="delta_backward_states",
    )(q, k, G, doc, hs, dhs, u, du, do)


def _backward_wy(k, v, beta, G, doc, Tm, du, dW, dk1, dG1, *, cfg, gated, has_seg):
    """The UT transform's backward per chunk: d(beta v) = T^T du, d(beta k_in) = T^T dW,
    dT, dL = -T^T dT T^T; finishes dk, dv, dbeta and dG; grid (B*H, N)."""
    B, Tp, H, Kp = k.shape
    Vp, C = v.shape[-1], cfg.chunk
    BV, exact, cd = common.value_block(Vp, cfg.block_v_out), k.dtype == f32, k.dtype

    def kernel(k_ref, v_ref, b_ref, g_ref, doc_ref, t_ref, du_ref, dw_ref, dk1_ref, dg1_ref,
               dk_ref, dv_ref, db_ref, dg_ref):
        n = pl.program_id(1)
        r = jnp.arange(C, dtype=jnp.int32)
        k = k_ref[...]
        kf, beta, Tm = k.astype(f32), b_ref[...][:, None], t_ref[...]
        incl, w_in, _, _ = _pairs(doc_ref, n, C, has_seg)
        strict = incl & (r[:, None] > r[None, :])
        G = g_ref[...][:, None] if gated else None
        gam = _gamma(G, incl)
        if gated:
            w_in = w_in * jnp.exp(G)
        kk = dot(k, k, tb=True, exact=exact)
        kin = kf * w_in
        dT = jnp.zeros((C, C), f32)
        dbeta = jnp.zeros((C,), f32)
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            du_b, v_b = du_ref[:, cols].astype(f32), v_ref[:, cols].astype(f32)
            tdu = dot(Tm, du_b, ta=True, exact=exact)
            dv_ref[:, cols] = (beta * tdu).astype(dv_ref.dtype)
            dbeta += jnp.sum(v_b * tdu, axis=1)
            dT += dot(du_b, v_b * beta, tb=True, exact=exact)
        dW = dw_ref[...].astype(f32)
        tdw = dot(Tm, dW, ta=True, exact=exact)
        dkin = beta * tdw
        dbeta += jnp.sum(kin * tdw, axis=1)
        dT += dot(dW, kin * beta, tb=True, exact=exact)
        dL = -dot(dot(Tm, dT, ta=True, exact=exact), Tm, tb=True, exact=exact)
        dL = jnp.where(strict, dL, 0.0)
        M = dL * gam
        dbeta += jnp.sum(M * kk, axis=1)
        dKK = (beta * M).astype(cd)
        dk = (dk1_ref[...].astype(f32) + dkin * w_in + dot(dKK, k, exact=exact)
              + dot(dKK, k, ta=True, exact=exact))
        dk_ref[...] = dk.astype(dk_ref.dtype)
        db_ref[...] = dbeta
        if gated:
            PL = M * (beta * kk)                                  # dL * L on the strict part
            dg_ref[...] = (dg1_ref[...] + jnp.sum(PL, axis=1) - jnp.sum(PL, axis=0)
                           + jnp.sum(dkin * kin, axis=1))
        else:
            dg_ref[...] = jnp.zeros((C,), f32)

    rows = lambda X: common.spec(H, C, X, t=0)
    vec = lambda: common.spec(H, C, t=0)
    shp = lambda X, dt: jax.ShapeDtypeStruct((B, Tp, H) + X, dt)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), rows(Vp), vec(), vec(), common.doc_spec(H, Tp), rows(C), rows(Vp),
                  rows(Kp), rows(Kp), vec()],
        out_specs=[rows(Kp), rows(Vp), vec(), vec()],
        out_shape=[shp((Kp,), k.dtype), shp((Vp,), v.dtype), shp((), f32), shp((), f32)],
        compiler_params=triton_params(cfg, cfg.warps_bwd, cfg.stages_bwd),
        interpret=interpret(cfg), name="delta_backward_wy",
    )(k, v, beta, G, doc, Tm, du, dW, dk1, dG1)
