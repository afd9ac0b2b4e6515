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

KDA's vector gate (`delta.py`): the same two kernels leave the pairs to the GLA intra backward.
They write dA, dAkk = beta dL (masked) and the per-channel per-row terms dGin (of q_in and k_in,
dGtot on the last row) and dR (of k_out), unrouted; `intra.intra_backward` then routes them with
the q-k pairs and finishes dq and dk, and a second call routes the k-k pairs of L (q = k there, so
both of its key gradients are dk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.gpu import common, intra
from linear_jax.kernels.gpu.common import F32, Chunk

rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)


def backward(ctx, q, k, v, beta, g, G, doc, hs, dhs, u, du, do, W, Tm, Akk, *, scale):
    """dq, dk, dv (input dtypes), dbeta and dg [B,Tp,H(,Kp)] float32 (dg None without a gate). G
    the gates' prefix sums (`common.prefix_sums`); the suffix sums are formed here. Akk: the
    vector gate's k-k intra matrix (None otherwise)."""
    if ctx.kind == "vector":
        dq, dk1, dW, dA, dgin, dr = _backward_states(ctx, q, k, g, G, g, doc, hs, dhs, u, du, do,
                                                     scale=scale)
        dk, dv, dbeta, dgin, dAkk = _backward_wy(ctx, k, v, beta, g, G, doc, Tm, du, dW, dk1,
                                                 dgin, Akk)
        dq, dk, dg = intra.intra_backward(ctx, q, k, g, G, dA, dq, dk, dgin, dr, scale=scale)
        dkq, dkk, dg = intra.intra_backward(ctx, k, k, g, G, dAkk, dk, jnp.zeros(k.shape, F32),
                                            dg, scale=1.0)
        return dq, (dkq.astype(F32) + dkk).astype(k.dtype), dv, dbeta, dg
    R = common.suffix_sums(g, ctx.C) if ctx.kind == "scalar" else g
    dq, dk1, dW, dg1 = _backward_states(ctx, q, k, g, G, R, doc, hs, dhs, u, du, do,
                                        scale=scale)
    dk, dv, dbeta, dg = _backward_wy(ctx, k, v, beta, g, G, doc, Tm, du, dW, dk1,
                                     jnp.sum(dg1, axis=0), None)
    return dq, dk, dv, dbeta, common.gate_grad_out(ctx, dg) if ctx.kind == "scalar" else None


def _backward_states(ctx, q, k, g, G, R, doc, hs, dhs, u, du, do, *, scale):
    """Per chunk and K tile kb: dA = do u^T, dq, the k_out and intra parts of dk, dW = -du S_n^T,
    and the gate terms that need no T; grid (B*H, N, Kp/BK). The vector gate's dq and dk leave
    the pairs out (float32), and dA, dGin and dR are written instead of dg."""
    B, Tp, H, Kp = q.shape
    Vp, C, cfg = u.shape[-1], ctx.C, ctx.cfg
    BK, BV = min(cfg.block_k, Kp), common.value_block(Vp, cfg.block_v_out)
    NK, cd, vec = Kp // BK, q.dtype, ctx.kind == "vector"

    def kernel(q_ref, k_ref, g_ref, G_ref, r_ref, doc_ref, h_ref, dh_ref, u_ref, du_ref, do_ref,
               dq_ref, dk_ref, dw_ref, dg_ref, *vec_refs):
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
        dA = jnp.where(ch.masks[0], dA, 0.0)
        if vec:
            _vector_rows(ctx, ch, kb, g_ref[:, kcols], G_ref[:, kcols], qt, kt, dA, dqg, dkg, hd,
                         scale, dq_ref, dk_ref, dg_ref, *vec_refs)
            return
        gate = ctx.kind == "scalar"
        decay, e_in, e_out, a = ch.exact(g_ref[...] if gate else None, G_ref[...] if gate else None,
                                         r_ref[...] if gate else None,
                                         G_ref[C - 1] if gate else None)
        dAd = (dA * decay).astype(cd)
        dq_ref[...] = ((ctx.dot(dAd, kt) + dqg * e_in) * scale).astype(dq_ref.dtype)
        dk_ref[...] = (ctx.dot(dAd, qt, ta=True) * scale + dkg * e_out).astype(dk_ref.dtype)
        if ctx.kind == "scalar":
            # this K tile's share of the pairs: q k^T is a sum over the K tiles and the routing is
            # linear, so each tile routes its own and `backward` sums the tiles' dg; no program
            # holds whole [C, Kp] rows of q and k as dot operands (128 KiB at K = 256 in float32)
            P = dA * ctx.dot(qt, kt, tb=True) * scale * decay
            dg_ref[...] = ch.exact_grad(P, rowsum(dqg * e_in * qt.astype(F32)) * scale,
                                        rowsum(dkg * e_out * kt.astype(F32)),
                                        a * jnp.sum(hd).reshape(1, 1))
        else:
            dg_ref[...] = jnp.zeros((C,), F32)

    rows = lambda X: common.spec(H, C, X, t=0)
    tile = common.spec(H, C, BK, t=0, x=1)
    st = lambda: common.states_spec(H, Tp // C, BK, Vp, n=0, k=1)
    shp = lambda dt, X=Kp: jax.ShapeDtypeStruct((B, Tp, H, X), dt)
    if vec:     # dq, dk, dW, dGin, then dA (on the first K tile) and dR
        out_specs = [tile, tile, tile, tile, rows(C), tile]
        out_shape = [shp(F32), shp(F32), shp(common.half_dtype(cd)), shp(F32), shp(F32, C),
                     shp(F32)]
    else:
        out_specs = [tile, tile, tile, pl.BlockSpec((None, None, C, None),
                                                    lambda bh, n, kb: (kb, bh // H, n, bh % H))]
        out_shape = [shp(q.dtype), shp(common.half_dtype(cd)), shp(common.half_dtype(cd)),
                     jax.ShapeDtypeStruct((NK, B, Tp, H), F32)]
    outs = ctx.call(
        kernel, grid=(B * H, Tp // C, NK),
        in_specs=[rows(Kp), rows(Kp)] + [rows(Kp) if vec else common.spec(H, C, t=0)] * 3 + [
            common.doc_spec(H, Tp), st(), st(), rows(Vp), rows(Vp), rows(Vp)],
        out_specs=out_specs, out_shape=out_shape,
        warps=cfg.warps_bwd, stages=cfg.stages_bwd, name="delta_backward_states",
    )(q, k, g, G, R, doc, hs, dhs, u, du, do)
    if vec:
        dq, dk, dW, dgin, dA, dr = outs
        return dq, dk, dW, dA, dgin, dr
    return outs


def _vector_rows(ctx, ch, kb, g, G, qt, kt, dA, dqg, dkg, hd, scale, dq_ref, dk_ref, dgin_ref,
                 da_ref, dr_ref):
    """The vector gate's part of `_backward_states` for one K tile: dq, dk without the pairs and
    the per-row gate terms, per channel (e_in from the exact prefix sums G, e_out and a from the
    tile's gates g [C, BK]); dGtot joins dGin on the last row, whose span holds every gate."""
    C = ctx.C
    _, e_out, a = ch.vector(g, want_in=False)
    e_in = tiles.masked_factors(ch.masks, jnp.exp(G), None, None)[0]
    dq, dk = dqg * (scale * e_in), dkg * e_out
    dq_ref[...] = dq
    dk_ref[...] = dk
    last = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
    dgin_ref[...] = qt.astype(F32) * dq + jnp.where(last, a * hd.reshape(1, -1), 0.0)
    dr_ref[...] = kt.astype(F32) * dk

    @pl.when(kb == 0)
    def _():
        da_ref[...] = dA


def _backward_wy(ctx, k, v, beta, g, G, doc, Tm, du, dW, dk1, dg1, Akk):
    """The UT transform's backward per chunk: d(beta v) = T^T du, d(beta k_in) = T^T dW,
    dT, dL = -T^T dT T^T; finishes dk, dv, dbeta and dg; grid (B*H, N). Vector gate (Akk
    given): dg1 is dGin, returned with k_in's terms added, dk leaves the pairs of L out (float32),
    and dAkk = beta dL is returned last."""
    B, Tp, H, Kp = k.shape
    Vp, C, cfg = v.shape[-1], ctx.C, ctx.cfg
    BV, cd, vec = common.value_block(Vp, cfg.block_v_out), k.dtype, ctx.kind == "vector"

    def kernel(k_ref, v_ref, b_ref, g_ref, G_ref, doc_ref, t_ref, du_ref, dw_ref, dk1_ref,
               dg1_ref, *refs):
        akk_ref, (dk_ref, dv_ref, db_ref, dg_ref, *dakk_ref) = (
            (refs[0], refs[1:]) if vec else (None, refs))
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
        if vec:         # exp(Gin) per channel, from the exact prefix sums
            e_in = tiles.masked_factors(ch.masks, jnp.exp(G_ref[...]), None, None)[0]
        else:
            decay, e_in, _, _ = ch.exact(g_ref[...] if gate else None,
                                         G_ref[...] if gate else None, None, None)
        kin = kf * e_in
        dW = dw_ref[...].astype(F32)
        tdw = ctx.dot(Tm, dW, ta=True)
        dkin = beta * tdw
        dbeta += rowsum(kin * tdw)
        dT += ctx.dot(dW, kin * beta, tb=True)
        dL = -ctx.dot(ctx.dot(Tm, dT, ta=True), Tm, tb=True)
        dL = jnp.where(ch.row > ch.col, dL, 0.0)
        if vec:
            db_ref[...] = jnp.sum(dbeta + rowsum(dL * akk_ref[...]), axis=1)
            dakk_ref[0][...] = jnp.where(ch.masks[0], dL, 0.0) * beta
            dk_ref[...] = dk1_ref[...] + dkin * e_in
            dg_ref[...] = dg1_ref[...] + dkin * kin
            return
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
    per_token = common.spec(H, C, t=0)
    gate = rows(Kp) if vec else per_token
    shp = lambda X, dt: jax.ShapeDtypeStruct((B, Tp, H) + X, dt)
    out_specs = [rows(Kp), rows(Vp), per_token, gate]
    out_shape = [shp((Kp,), F32 if vec else k.dtype), shp((Vp,), v.dtype), shp((), F32),
                 shp((Kp,) if vec else (), F32)]
    return ctx.call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), rows(Vp), per_token, gate, gate, common.doc_spec(H, Tp), rows(C),
                  rows(Vp), rows(Kp), rows(Kp), gate] + ([rows(C)] if vec else []),
        out_specs=out_specs + ([rows(C)] if vec else []),
        out_shape=out_shape + ([shp((C,), F32)] if vec else []),
        warps=cfg.warps_bwd, stages=cfg.stages_bwd, name="delta_backward_wy",
    )(k, v, beta, g, G, doc, Tm, du, dW, dk1, dg1, *([Akk] if vec else []))
