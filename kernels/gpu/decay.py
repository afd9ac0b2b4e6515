"""Pallas GPU kernels of the decay family: linear attention, simple GLA (scalar gate), GLA (vector).

Same math as `linear_jax.ops.common.decay_chunk` (q already scaled by `scale`), per chunk with the
span sums of `linear_jax.kernels.tiles` (D_ij, Gin_i, R_j, Gtot: sums of exactly the gates inside
each span) and the packed-document masks (same, in, out, keep):

    o_i   = sum_{j<=i, same} [q_i . (k_j * exp(D_ij))] v_j  +  (q_i * exp(Gin_i) * in_i)^T S_n
    S_n+1 = keep * exp(Gtot) * S_n  +  sum_j (k_j * exp(R_j) * out_j) v_j^T

Forward (from the gates' prefix sums, values only: `common` says why): the one-pass form
(`fused.py`) where its grid fills the GPU and nothing is kept for a backward, else the state pass
(`chunk_state`, writes every entering S_n), for the vector gate the intra matrix A (`intra`), then
one parallel output kernel over (B*H, N, V/BV). Backward
(`jax.custom_vjp`): the reverse state pass (dS_n+1 for every chunk, dS_0 = d initial_state), then
one parallel kernel over (B*H, N, K/BK) for dv, dq, dk and dg: with qg = q exp(Gin) in, kg =
k exp(R) out, P = dA * A the pair gradients, the gate gradient is `tiles.scalar_gate_grad(P,
rowsum(qg dqg), rowsum(kg dkg), exp(Gtot) <S_n, dS_n+1>)` for the scalar gate (summed over the K
tiles afterwards); for the vector gate the same per key channel, this kernel routing the per-row
terms and `intra.intra_backward` the pairs. No gradient is formed as a difference of cumulative
sums, so dg stays exact when every gate is strong.

Cost of the exact gate gradient (C = 64, bf16, per chunk and K tile of the backward kernel): D
and U @ P are two [C, C] x [C, C] 0/1 products in tf32 (2 x 262 K MACs, about 1 M bf16-MAC
equivalents) against about 1.3 M bf16 MACs of q k^T, do v^T, do S^T, v dS^T and dv; Gin, R and
Gtot are masked [C, C] sums. For the vector gate, exp(R) and the routing of the per-row terms are
three [C, C] x [C, BK] products, and the XLA transpose of the prefix sums (166 us at T = 2048 on
an H200, benchmarks/NOTES.md) is gone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.gpu import common, fused, intra
from linear_jax.kernels.gpu.chunk_state import gate_rows, state_pass
from linear_jax.kernels.gpu.common import F32, Chunk, Ctx


def output(ctx, q, k, v, G, A, doc, hs, *, scale):
    """o = A v + (q exp(Gin) in)^T S_n per chunk (G the gates' prefix sums); A from q k^T (scalar
    / no gate; also the delta rule's, on u in place of v) or given (vector gate)."""
    B, Tp, H, Kp = q.shape
    Vp, C, cfg = v.shape[-1], ctx.C, ctx.cfg
    N, BV = Tp // C, common.value_block(Vp, cfg.block_v_out)
    vec = ctx.kind == "vector"

    def kernel(q_ref, k_ref, v_ref, g_ref, a_ref, doc_ref, h_ref, o_ref):
        ch = Chunk(ctx, pl.program_id(1), doc_ref)
        q = q_ref[...]
        decay, e_in, _, _ = gate_rows(ctx, ch, g_ref, 0, pairs=not vec)
        A = a_ref[...] if vec else ctx.dot(q, k_ref[...], tb=True) * scale * decay
        qh = (q.astype(F32) * (scale * e_in)).astype(q.dtype)
        o = ctx.dot(A.astype(q.dtype), v_ref[...]) + ctx.dot(qh, h_ref[...].astype(q.dtype))
        o_ref[...] = o.astype(o_ref.dtype)

    rows = lambda X: common.spec(H, C, X, t=0)
    per_token = rows(Kp) if vec else common.spec(H, C, t=0)
    return ctx.call(
        kernel, grid=(B * H, N, Vp // BV),
        in_specs=[rows(Kp), rows(Kp), common.spec(H, C, BV, t=0, x=1), per_token,
                  rows(C) if vec else common.spec(H, C, t=0), common.doc_spec(H, Tp),
                  common.states_spec(H, N, Kp, BV, n=0, v=1)],
        out_specs=common.spec(H, C, BV, t=0, x=1),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, Vp), v.dtype),
        warps=cfg.warps_out, stages=cfg.stages_out, name="decay_output",
    )(q, k, v, G, G if A is None else A, doc, hs)


def _backward_main(ctx, q, k, v, g, G, R, A, doc, hs, dhs, do, *, scale):
    """dv, and dq, dk, dg (scalar / no gate) or the inter-chunk parts of dq, dk and the gate's
    per-row terms, and dA (vector gate). Grid (B*H, N, Kp/BK): each program owns one K tile of dq,
    dk (and dg); the program of the first tile also writes dv (and dA), which need all of K. g the
    gates, G and R their exact prefix and suffix sums (`common.prefix_sums`, `suffix_sums`; R None
    where unused). The scalar gate's dg is summed over the K tiles afterwards."""
    B, Tp, H, Kp = q.shape
    Vp, C, cfg = v.shape[-1], ctx.C, ctx.cfg
    BK, BV = min(cfg.block_k_bwd, Kp), common.value_block(Vp, cfg.block_v_out)
    N, NK = Tp // C, Kp // BK
    vec, cd = ctx.kind == "vector", q.dtype
    rows_out = vec and cfg.gla_bwd == "rows"       # the intra kernel routes the per-row terms
    fold = vec and cfg.gla_bwd == "fold"           # "rows"' factors, routed here (one dg part)
    one_pass = cfg.dv_pass == "loop"               # dv inside the value loop

    def kernel(q_ref, k_ref, v_ref, g_ref, G_ref, r_ref, a_ref, doc_ref, h_ref, dh_ref, do_ref,
               *outs):
        kb = pl.program_id(2)
        on_first = (lambda f: f()) if NK == 1 else pl.when(kb == 0)
        kc = pl.ds(kb * BK, BK)
        ch = Chunk(ctx, pl.program_id(1), doc_ref)

        def gate_factors():
            """(decay [C, C] (scalar / no gate; None for the vector gate), e_in, e_out, a)."""
            if rows_out or fold:                        # exp(Gin) from the exact prefix sums
                _, e_out, a = ch.vector(g_ref[:, kc], want_in=False)
                e_in = tiles.masked_factors(ch.masks, jnp.exp(G_ref[:, kc]), None, None)[0]
                return None, e_in, e_out, a
            if vec:
                return (None,) + ch.vector(g_ref[:, kc])
            gate = ctx.kind == "scalar"
            return ch.exact(g_ref[...] if gate else None, G_ref[...] if gate else None,
                            r_ref[...] if gate else None, G_ref[C - 1] if gate else None)

        def all_keys(e_out):
            """exp(R) out of every key channel: the tile's own where it holds them all."""
            return e_out if NK == 1 or not vec else ch.vector(g_ref[...], want_in=False)[1]

        if one_pass:
            # the pre-exact kernel's order: A, the factors and the keys' dv operand formed once,
            # before the loop, so each value tile's do and dS are read once (the default re-reads
            # them in a second pass); what stays live through the loop is A, its 16-bit copy, kh
            # and (scalar) the pair decay: the old kernel's set, with the exact spans' scan done
            # before the loop instead of a difference of prefix sums
            factors = gate_factors()
            A_pre = a_ref[...] if vec else (
                ctx.dot(q_ref[...], k_ref[...], tb=True) * scale * factors[0])
            e_out_all = all_keys(factors[2])
            A_cd = A_pre.astype(cd)
            kh_all = (k_ref[...].astype(F32) * e_out_all).astype(cd)
        # the value loop first, with only its accumulators live (the gate factors, A and the
        # [C, C] spans come after it: at 8 warps a [C, C] float32 tile is 16 registers a thread,
        # and the first exact version, which formed them before the loop, spilled 3x more)
        dA = jnp.zeros((C, C), F32)
        dqg, dkg = jnp.zeros((C, BK), F32), jnp.zeros((C, BK), F32)
        hd = jnp.zeros((BK,), F32)
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            v_b, do_b = v_ref[:, cols], do_ref[:, cols]
            h_b, dh_b = h_ref[kc, cols], dh_ref[kc, cols]
            dA += ctx.dot(do_b, v_b, tb=True)
            dqg += ctx.dot(do_b, h_b.astype(cd), tb=True)          # dL/d(q exp(Gin) in)
            dkg += ctx.dot(v_b, dh_b.astype(cd), tb=True)          # dL/d(k exp(R) out)
            hd += jnp.sum(h_b.astype(F32) * dh_b.astype(F32), axis=1)
            if one_pass:
                @on_first
                def _():
                    dv = (ctx.dot(A_cd, do_b, ta=True)
                          + ctx.dot(kh_all, dh_ref[:, cols].astype(cd)))
                    outs[0][:, cols] = dv.astype(outs[0].dtype)

        dA = jnp.where(ch.masks[0], dA, 0.0)
        qt, kt = q_ref[:, kc].astype(F32), k_ref[:, kc].astype(F32)
        decay, e_in, e_out, a = factors if one_pass else gate_factors()
        dq = dqg * (scale * e_in)
        dk = dkg * e_out
        if vec:
            d_gin, d_r = qt * dq, kt * dk                 # dL/dGin, dL/dR per row and channel
        else:                                             # summed over the tile's channels now
            rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)
            d_gin, d_r = rowsum(qt * dq), rowsum(kt * dk)

        def value_grad(A, e_out):
            """dv = A^T do + (k exp(R) out) dS_n+1, a second pass over the value tiles (do and
            dS are re-read, from L2) by the first K tile's program."""
            if one_pass:                                  # written in the value loop
                return
            e_out_all = all_keys(e_out)

            @on_first
            def _():
                Acd = A.astype(cd)
                kh = (k_ref[...].astype(F32) * e_out_all).astype(cd)
                for b in range(Vp // BV):
                    cols = pl.ds(b * BV, BV)
                    dv = (ctx.dot(Acd, do_ref[:, cols], ta=True)
                          + ctx.dot(kh, dh_ref[:, cols].astype(cd)))
                    outs[0][:, cols] = dv.astype(outs[0].dtype)

        if vec:
            @on_first
            def _():
                outs[1][...] = dA

            d_tot = a * hd.reshape(1, BK)
            outs[2][...] = dq
            outs[3][...] = dk
            if rows_out:
                # dGin (with dGtot on the last row: every gate is at or before it) and dR, per
                # row: `intra.intra_backward` routes them with its sub-chunk products
                last = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
                outs[4][...] = d_gin + jnp.where(last, d_tot, 0.0)
                outs[5][...] = d_r
            else:
                outs[4][...] = ch.vector_grad(d_gin, d_r, d_tot)
            value_grad(a_ref[...], e_out)
            return
        A = A_pre if one_pass else ctx.dot(q_ref[...], k_ref[...], tb=True) * scale * decay
        dAd = (dA * decay).astype(cd)
        outs[1][...] = (dq + ctx.dot(dAd, k_ref[:, kc]) * scale).astype(outs[1].dtype)
        outs[2][...] = (dk + ctx.dot(dAd, q_ref[:, kc], ta=True) * scale).astype(outs[2].dtype)
        if ctx.kind == "scalar":
            P = jnp.where(kb == 0, dA * A, 0.0)                   # the pairs count once
            outs[3][...] = ch.exact_grad(P, d_gin, d_r, a * jnp.sum(hd).reshape(1, 1))
        value_grad(A, e_out)

    rows = lambda X: common.spec(H, C, X, t=0)
    tile = common.spec(H, C, BK, t=0, x=1)
    per_token = rows(Kp) if vec else common.spec(H, C, t=0)
    in_specs = [rows(Kp), rows(Kp), rows(Vp), per_token, per_token, per_token,
                rows(C) if vec else common.spec(H, C, t=0), common.doc_spec(H, Tp),
                common.states_spec(H, N, Kp, Vp, n=0), common.states_spec(H, N, Kp, Vp, n=0),
                rows(Vp)]
    shp = lambda X, dt: jax.ShapeDtypeStruct((B, Tp, H) + X, dt)
    if vec:
        out_specs = [rows(Vp), rows(C), tile, tile, tile] + ([tile] if rows_out else [])
        out_shape = [shp((Vp,), v.dtype), shp((C,), F32)] + [shp((Kp,), F32)] * (
            4 if rows_out else 3)
    else:
        out_specs = [rows(Vp), tile, tile]
        out_shape = [shp((Vp,), v.dtype), shp((Kp,), q.dtype), shp((Kp,), k.dtype)]
        if ctx.kind == "scalar":
            out_specs.append(pl.BlockSpec((None, None, C, None),
                                          lambda bh, n, kb: (kb, bh // H, n, bh % H)))
            out_shape.append(jax.ShapeDtypeStruct((NK, B, Tp, H), F32))
    outs = ctx.call(kernel, grid=(B * H, N, NK), in_specs=in_specs, out_specs=out_specs,
                    out_shape=out_shape, warps=cfg.warps_bwd, stages=cfg.stages_bwd,
                    name="decay_backward")(q, k, v, g, G, g if R is None else R,
                                           g if A is None else A, doc, hs, dhs, do)
    if ctx.kind == "scalar":
        outs = (*outs[:3], common.gate_grad_out(ctx, jnp.sum(outs[3], axis=0)))
    return outs


@functools.cache
def _core(ctx: Ctx, scale: float):
    """custom_vjp of (q, k, v, g, doc, h0) -> (o, S_final) on padded inputs, one static setup."""
    sdt = lambda x: F32 if x.dtype == F32 else x.dtype
    prefix = lambda g: g if ctx.kind == "none" else common.prefix_sums(g, ctx.C)
    # the vector gate's prefix sums are kept for the backward (an XLA cumsum of [B, T, H, K]
    # float32 costs ~160 us at T = 2048 on an H200); the scalar gate's are recomputed
    keep = lambda G: G if ctx.kind == "vector" else None

    def fwd(q, k, v, g, doc, h0, residuals):
        B, Tp, H, _ = q.shape
        G = prefix(g)
        A = intra.intra_forward(ctx, q, k, G, doc, scale=scale) if ctx.kind == "vector" else None
        if fused.use_fused(B * H, Tp, v.shape[-1], ctx.cfg, residuals):
            o, S, *hs = fused.forward(ctx, q, k, v, G, doc, h0, A=A, scale=scale,
                                      residuals=residuals)
            return (o, S), (q, k, v, g, doc, hs[0] if hs else None, A, keep(G))
        hs, S = state_pass(ctx, k, v, G, doc, h0, reverse=False, state_dtype=sdt(q))
        o = output(ctx, q, k, v, G, A, doc, hs, scale=scale)
        return (o, S), (q, k, v, g, doc, hs, A, keep(G))

    def bwd(res, cts):
        q, k, v, g, doc, hs, A, G = res
        do, dS = cts
        do = do.astype(v.dtype)
        G = prefix(g) if G is None else G
        dhs, dh0 = state_pass(ctx, q, do, G, doc, dS, reverse=True, scale=scale,
                              state_dtype=sdt(q))
        R = common.suffix_sums(g, ctx.C) if ctx.kind == "scalar" else None
        outs = _backward_main(ctx, q, k, v, g, G, R, A, doc, hs, dhs, do, scale=scale)
        if ctx.kind == "vector":
            dv, dA, dq_p, dk_p, *dg_p = outs
            dq, dk, dg = intra.intra_backward(ctx, q, k, g, G, dA, dq_p, dk_p, *dg_p,
                                              scale=scale)
        elif ctx.kind == "scalar":
            dv, dq, dk, dg = outs
        else:
            (dv, dq, dk), dg = outs, None
        return dq, dk, dv, dg, None, dh0

    return common.custom_vjp(fwd, bwd)


def decay(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry (the chunk impls' signature, heads expanded, plus the kernel config: the
    registry always passes one; None takes `TritonChunkConfig.default()`). g: None, [B, T, H] or
    [B, T, H, K] log decays. Returns (o in v's dtype, S float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    p, doc, ctx, gp = common.gated_entry(q, v, g, segment_ids, chunk_size, config)
    o, S = _core(ctx, float(scale))(p(q, p.Kp), p(k, p.Kp), p(v, p.Vp), gp, doc,
                                    p.state(initial_state, B, H, K, V))
    return o[:, :T, :, :V].astype(v.dtype), S[:, :, :K, :V]
