"""Backward kernels of the delta-rule family (see `delta.py` for the forward and the notation).

The reverse state pass (`chunk_state.state_pass` with W: du_n and every dS_n+1) runs first. Then,
per chunk, with T = (I + L)^-1 and W kept from the forward:

    dA = do u^T,  dW = -du S_n^T,  d(beta v) = T^T du,  d(beta k_in) = T^T dW,
    dT = dW (beta k_in)^T + du (beta v)^T,  dL = -T^T dT T^T (strictly lower, same document),

and dq, dk, dv, dbeta from those. The gate gradient is `tiles.scalar_gate_grad` of the pair
gradients dA * A + dL * L and the per-row terms of q_in = q exp(Gin), k_in, k_out = k exp(R) and
the chunk decay: every pair and row reaches exactly the gates of its span, nothing is subtracted.
Two parallel kernels, so that the float32 tiles stay in registers: the state-side terms tiled over
K (`_backward_states`, grid (B*H, N, Kp/BK)), then the UT transform's backward (`_backward_wy`,
grid (B*H, N)); the gate gradient is linear in its terms, so each kernel routes its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.common import F32, Chunk

rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)


def backward(ctx, q, k, v, beta, g, G, doc, hs, dhs, u, du, do, W, Tm, *, scale):
    """dq, dk, dv (input dtypes), dbeta and dg [B,Tp,H] float32 (dg None without a gate). G the
    gates' prefix sums (`common.prefix_sums`); the suffix sums are formed here."""
    R = common.suffix_sums(g, ctx.C) if ctx.kind == "scalar" else g
    dq, dk1, dW, dg1 = _backward_states(ctx, q, k, g, G, R, doc, hs, dhs, u, du, do,
                                        scale=scale)
    dk, dv, dbeta, dg = _backward_wy(ctx, k, v, beta, g, G, doc, Tm, du, dW, dk1,
                                     jnp.sum(dg1, axis=0))
    return dq, dk, dv, dbeta, common.gate_grad_out(ctx, dg) if ctx.kind == "scalar" else None


def _backward_states(ctx, q, k, g, G, R, doc, hs, dhs, u, du, do, *, scale):
    """Per chunk and K tile kb: dA = do u^T, dq, the k_out and intra parts of dk, dW = -du S_n^T,
    and the gate terms that need no T; grid (B*H, N, Kp/BK)."""
    B, Tp, H, Kp = q.shape
    Vp, C, cfg = u.shape[-1], ctx.C, ctx.cfg
    BK, BV = min(cfg.block_k, Kp), common.value_block(Vp, cfg.block_v_out)
    NK, cd = Kp // BK, q.dtype

    def kernel(q_ref, k_ref, g_ref, G_ref, r_ref, doc_ref, h_ref, dh_ref, u_ref, du_ref, do_ref,
               dq_ref, dk_ref, dw_ref, dg_ref):
        kb = pl.program_id(2)
        kcols = pl.ds(kb * BK, BK)
        ch = Chunk(ctx, pl.program_id(1), doc_ref)
        dA = jnp.zeros((C, C), F32)
        dqg, dkg, dW = (jnp.zeros((C, BK), F32) for _ in range(3))
        hd = jnp.zeros((BK,), F32)
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            do_b, u_b, du_b = do_ref[:, cols], u_ref[:, cols], du_ref[:, cols]
            h_b, dh_b = h_ref[:, cols], dh_ref[:, cols]
            dA += ctx.dot(do_b, u_b, tb=True)
            dqg += ctx.dot(do_b, h_b.astype(cd), tb=True)         # dL/d(q exp(Gin) in)
            dkg += ctx.dot(u_b, dh_b.astype(cd), tb=True)         # dL/d(k exp(R) out)
            dW -= ctx.dot(du_b.astype(F32), h_b.astype(F32), tb=True)
            hd += jnp.sum(h_b.astype(F32) * dh_b.astype(F32), axis=1)
        # the gate spans after the value loop: fewer live tiles through it
        dw_ref[...] = dW.astype(dw_ref.dtype)
        qt, kt = q_ref[:, kcols], k_ref[:, kcols]
        gate = ctx.kind == "scalar"
        decay, e_in, e_out, a = ch.exact(g_ref[...] if gate else None, G_ref[...] if gate else None,
                                         r_ref[...] if gate else None,
                                         G_ref[C - 1] if gate else None)
        dA = jnp.where(ch.masks[0], dA, 0.0)
        dAd = (dA * decay).astype(cd)
        dq_ref[...] = ((ctx.dot(dAd, kt) + dqg * e_in) * scale).astype(dq_ref.dtype)
        dk_ref[...] = (ctx.dot(dAd, qt, ta=True) * scale + dkg * e_out).astype(dk_ref.dtype)
        if ctx.kind == "scalar":
            P = jnp.where(kb == 0, dA * ctx.dot(q_ref[...], k_ref[...], tb=True) * scale * decay,
                          0.0)                                    # the pairs count once
            dg_ref[...] = ch.exact_grad(P, rowsum(dqg * e_in * qt.astype(F32)) * scale,
                                        rowsum(dkg * e_out * kt.astype(F32)),
                                        a * jnp.sum(hd).reshape(1, 1))
        else:
            dg_ref[...] = jnp.zeros((C,), F32)

    rows = lambda X: common.spec(H, C, X, t=0)
    tile = common.spec(H, C, BK, t=0, x=1)
    st = lambda: common.states_spec(H, Tp // C, BK, Vp, n=0, k=1)
    return ctx.call(
        kernel, grid=(B * H, Tp // C, NK),
        in_specs=[rows(Kp), rows(Kp)] + [common.spec(H, C, t=0)] * 3 + [
            common.doc_spec(H, Tp), st(), st(), rows(Vp), rows(Vp), rows(Vp)],
        out_specs=[tile, tile, tile,
                   pl.BlockSpec((None, None, C, None), lambda bh, n, kb: (kb, bh // H, n, bh % H))],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Kp), q.dtype),
                   jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(cd)),
                   jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(cd)),
                   jax.ShapeDtypeStruct((NK, B, Tp, H), F32)],
        warps=cfg.warps_bwd, stages=cfg.stages_bwd, name="delta_backward_states",
    )(q, k, g, G, R, doc, hs, dhs, u, du, do)


def _backward_wy(ctx, k, v, beta, g, G, doc, Tm, du, dW, dk1, dg1):
    """The UT transform's backward per chunk: d(beta v) = T^T du, d(beta k_in) = T^T dW,
    dT, dL = -T^T dT T^T; finishes dk, dv, dbeta and dg; grid (B*H, N)."""
    B, Tp, H, Kp = k.shape
    Vp, C, cfg = v.shape[-1], ctx.C, ctx.cfg
    BV, cd = common.value_block(Vp, cfg.block_v_out), k.dtype

    def kernel(k_ref, v_ref, b_ref, g_ref, G_ref, doc_ref, t_ref, du_ref, dw_ref, dk1_ref,
               dg1_ref, dk_ref, dv_ref, db_ref, dg_ref):
        ch = Chunk(ctx, pl.program_id(1), doc_ref)
        k = k_ref[...]
        kf, beta, Tm = k.astype(F32), b_ref[...][:, None], t_ref[...]
        dT = jnp.zeros((C, C), F32)
        dbeta = jnp.zeros((C, 1), F32)
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            du_b, v_b = du_ref[:, cols].astype(F32), v_ref[:, cols].astype(F32)
            tdu = ctx.dot(Tm, du_b, ta=True)
            dv_ref[:, cols] = (beta * tdu).astype(dv_ref.dtype)
            dbeta += rowsum(v_b * tdu)
            dT += ctx.dot(du_b, v_b * beta, tb=True)
        # the gate spans after the value loop (fewer live [C, C] tiles through it), and L not
        # kept: dL * L = M * beta * (k k^T) below
        gate = ctx.kind == "scalar"
        decay, e_in, _, _ = ch.exact(g_ref[...] if gate else None, G_ref[...] if gate else None,
                                     None, None)
        kin = kf * e_in
        dW = dw_ref[...].astype(F32)
        tdw = ctx.dot(Tm, dW, ta=True)
        dkin = beta * tdw
        dbeta += rowsum(kin * tdw)
        dT += ctx.dot(dW, kin * beta, tb=True)
        dL = -ctx.dot(ctx.dot(Tm, dT, ta=True), Tm, tb=True)
        dL = jnp.where(ch.row > ch.col, dL, 0.0)
        M = dL * decay                                            # d(beta_i k_i . k_j)
        kk = ctx.dot(k, k, tb=True)
        dbeta += rowsum(M * kk)
        dKK = (beta * M).astype(cd)
        dk = (dk1_ref[...].astype(F32) + dkin * e_in + ctx.dot(dKK, k)
              + ctx.dot(dKK, k, ta=True))
        dk_ref[...] = dk.astype(dk_ref.dtype)
        db_ref[...] = jnp.sum(dbeta, axis=1)
        if ctx.kind == "scalar":
            dg_ref[...] = dg1_ref[...] + ch.exact_grad(M * (beta * kk), rowsum(dkin * kin), None,
                                                       None)
        else:
            dg_ref[...] = jnp.zeros((C,), F32)

    rows = lambda X: common.spec(H, C, X, t=0)
    vec = lambda: common.spec(H, C, t=0)
    shp = lambda X, dt: jax.ShapeDtypeStruct((B, Tp, H) + X, dt)
    return ctx.call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), rows(Vp), vec(), vec(), vec(), common.doc_spec(H, Tp), rows(C),
                  rows(Vp), rows(Kp), rows(Kp), vec()],
        out_specs=[rows(Kp), rows(Vp), vec(), vec()],
        out_shape=[shp((Kp,), k.dtype), shp((Vp,), v.dtype), shp((), F32), shp((), F32)],
        warps=cfg.warps_bwd, stages=cfg.stages_bwd, name="delta_backward_wy",
    )(k, v, beta, g, G, doc, Tm, du, dW, dk1, dg1)
