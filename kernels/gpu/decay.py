"""Pallas GPU kernels of the decay family: linear attention, simple GLA (scalar gate), GLA (vector).

Same math as `linear_jax.ops.common.decay_chunk` (q already scaled, G the chunk-local cumulative
gate, in/out/keep/same the packed-document masks of `common.chunk_masks`):

    o_i   = sum_{j<=i, same} [q_i . (k_j * exp(G_i - G_j))] v_j  +  (q_i * exp(G_i) * in_i)^T S_n
    S_n+1 = keep * exp(G_last) * S_n  +  sum_j (k_j * exp(G_last - G_j) * out_j) v_j^T

Forward: the state pass (`chunk_state`, writes every entering S_n), for the vector gate the intra
matrix A (`intra`), then one parallel output kernel over (B*H, N, V/BV). Backward
(`jax.custom_vjp`): the reverse state pass (dS_n+1 for every chunk, dS_0 = d initial_state),
then one parallel kernel
over (B*H, N) for dv, dq, dk and dG, where the gate gradient uses

    dG_i = q_i * dq_i - k_i * dk_i   (+ on the chunk's last row: sum_j k_j * dk_inter_j
                                        + keep * exp(G_last) * rowsum(S_n * dS_n+1))

summed over K for the scalar gate; XLA's autodiff of the chunk-local cumsum turns dG into dg.
bf16/fp16 inputs run bf16/fp16 dot operands with float32 accumulation; float32 inputs run IEEE
float32 dots (Triton's float32 default is tf32), and the state passes always accumulate in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import common, fused, intra
from linear_jax.kernels.gpu.chunk_state import state_pass
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params
from linear_jax.ops.common.chunking import doc_index, pad_time

f32 = jnp.float32


def _gate_terms(g_ref, kind, C):
    """G [C,1] or [C,Kp] and G_last (scalar or [1,Kp]) of this chunk (None, None: no gate)."""
    if kind == "none":
        return None, None
    if kind == "vector":
        return g_ref[...], g_ref[pl.ds(C - 1, 1), :]
    return g_ref[...][:, None], g_ref[C - 1]


def output(q, k, v, G, A, doc, hs, *, cfg, kind, has_seg, scale):
    """o = A v + (q exp(G) in)^T S_n per chunk; A from q k^T (scalar/no gate) or given (vector)."""
    B, Tp, H, Kp = q.shape
    Vp, C = v.shape[-1], cfg.chunk
    N, BV = Tp // C, common.value_block(Vp, cfg.block_v_out)
    exact = q.dtype == f32

    def kernel(q_ref, k_ref, v_ref, g_ref, a_ref, doc_ref, h_ref, o_ref):
        n = pl.program_id(1)
        q, k = q_ref[...], k_ref[...]
        G, _ = _gate_terms(g_ref, kind, C)
        mask = common.causal(C)
        w = jnp.full((C, 1), scale, f32) if G is None else scale * jnp.exp(G)
        if has_seg:
            in_rows, _, _, same = common.chunk_masks(doc_ref, n, C, True)
            mask = mask & same
            w = jnp.where(in_rows[:, None], w, 0.0)
        A = a_ref[...] if kind == "vector" else common.intra_scalar(q, k, G, mask, scale, exact)
        qh = (q.astype(f32) * w).astype(q.dtype)
        o = dot(A.astype(q.dtype), v_ref[...], exact=exact)
        o = o + dot(qh, h_ref[...].astype(q.dtype), exact=exact)
        o_ref[...] = o.astype(o_ref.dtype)

    vec = kind == "vector"
    return pl.pallas_call(
        kernel,
        grid=(B * H, N, Vp // BV),
        in_specs=[common.spec(H, C, Kp, t=0), common.spec(H, C, Kp, t=0),
                  common.spec(H, C, BV, t=0, x=1),
                  common.spec(H, C, Kp, t=0) if vec else common.spec(H, C, t=0),
                  common.spec(H, C, C, t=0) if vec else common.spec(H, C, t=0),
                  common.doc_spec(H, Tp), common.states_spec(H, N, Kp, BV, n=0, v=1)],
        out_specs=common.spec(H, C, BV, t=0, x=1),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, Vp), v.dtype),
        compiler_params=triton_params(cfg, cfg.warps_out, cfg.stages_out),
        interpret=interpret(cfg), name="decay_output",
    )(q, k, v, G, G if A is None else A, doc, hs)


def _backward_main(q, k, v, G, A, doc, hs, dhs, do, *, cfg, kind, has_seg, scale):
    """dv, and dq, dk, dG (scalar/none gate) or the inter-chunk parts and dA (vector gate).

    Grid (B*H, N, Kp/BK): each program owns one K tile of dq, dk (and dG); the program of the first
    tile also writes dv (and dA), which need all of K. The scalar gate's dG is summed over the
    K tiles afterwards."""
    B, Tp, H, Kp = q.shape
    Vp, C = v.shape[-1], cfg.chunk
    BK, BV = min(cfg.block_k_bwd, Kp), common.value_block(Vp, cfg.block_v_out)
    N, NK = Tp // C, Kp // BK
    exact, vec, cd = q.dtype == f32, kind == "vector", q.dtype

    def kernel(q_ref, k_ref, v_ref, g_ref, a_ref, doc_ref, h_ref, dh_ref, do_ref, *outs):
        n, kb = pl.program_id(1), pl.program_id(2)
        # dv and dA need all of K: the first K tile's program writes them
        on_first = (lambda f: f()) if NK == 1 else pl.when(kb == 0)
        kc = pl.ds(kb * BK, BK)
        q, k = q_ref[...], k_ref[...]
        qb, kbt = q_ref[:, kc], k_ref[:, kc]
        mask = common.causal(C)
        if kind == "none":
            G = Gt = None
            wq = wk = wk_full = jnp.ones((C, 1), f32)
            decay = jnp.float32(1.0)
        elif vec:
            G, Gt, Glt = g_ref[...], g_ref[:, kc], g_ref[pl.ds(C - 1, 1), kc]
            wq, wk, decay = jnp.exp(Gt), jnp.exp(Glt - Gt), jnp.exp(Glt)
            wk_full = jnp.exp(g_ref[pl.ds(C - 1, 1), :] - G)
        else:
            G = Gt = g_ref[...][:, None]
            Gl = g_ref[C - 1]
            wq, wk, decay = jnp.exp(G), jnp.exp(Gl - G), jnp.exp(Gl)
            wk_full = wk
        if has_seg:
            in_rows, out_rows, keep, same = common.chunk_masks(doc_ref, n, C, True)
            mask = mask & same
            wq = jnp.where(in_rows[:, None], wq, 0.0)
            wk = jnp.where(out_rows[:, None], wk, 0.0)
            wk_full = jnp.where(out_rows[:, None], wk_full, 0.0)
            decay = jnp.where(keep, decay, 0.0)
        A = a_ref[...] if vec else common.intra_scalar(q, k, G, mask, scale, exact)
        Acd, kh = A.astype(cd), (k.astype(f32) * wk_full).astype(cd)
        dA = jnp.zeros((C, C), f32)
        dqi, dki = jnp.zeros((C, BK), f32), jnp.zeros((C, BK), f32)
        hd = jnp.zeros((BK,), f32)
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            v_b, do_b = v_ref[:, cols], do_ref[:, cols]
            h_b, dh_b = h_ref[kc, cols], dh_ref[kc, cols]
            dA += dot(do_b, v_b, tb=True, exact=exact)
            dqi += dot(do_b, h_b.astype(cd), tb=True, exact=exact)
            dki += dot(v_b, dh_b.astype(cd), tb=True, exact=exact)
            hd += jnp.sum(h_b.astype(f32) * dh_b.astype(f32), axis=1)

            @on_first
            def _():
                dv = (dot(Acd, do_b, ta=True, exact=exact)
                      + dot(kh, dh_ref[:, cols].astype(cd), exact=exact))
                outs[0][:, cols] = dv.astype(outs[0].dtype)

        dA = jnp.where(mask, dA, 0.0)
        dqs = dqi * wq                                     # d(scaled q), inter-chunk part
        dki = dki * wk
        kf, qs = kbt.astype(f32), qb.astype(f32) * scale
        last = (jnp.arange(C, dtype=jnp.int32) == C - 1)[:, None]
        if vec:
            dGl = jnp.sum(kf * dki, axis=0)[None, :] + decay * hd[None, :]

            @on_first
            def _():
                outs[1][...] = dA

            outs[2][...] = dqs * scale
            outs[3][...] = dki
            outs[4][...] = qs * dqs - kf * dki + jnp.where(last, dGl, 0.0)
            return
        dAE = dA if G is None else dA * jnp.exp(jnp.where(mask, G - G.reshape(1, -1), -jnp.inf))
        dqs = dqs + dot(dAE.astype(cd), kbt, exact=exact)
        dk = dki + dot(dAE.astype(cd), qb, ta=True, exact=exact) * scale
        outs[1][...] = (dqs * scale).astype(outs[1].dtype)
        outs[2][...] = dk.astype(outs[2].dtype)
        if G is not None:
            dGl = jnp.sum(kf * dki) + decay * jnp.sum(hd)
            dG = jnp.sum(qs * dqs - kf * dk, axis=1)
            outs[3][...] = dG + jnp.where(last[:, 0], dGl, 0.0)
        else:
            outs[3][...] = jnp.zeros((C,), f32)

    rows = lambda X: common.spec(H, C, X, t=0)
    tile = common.spec(H, C, BK, t=0, x=1)
    g_spec = rows(Kp) if vec else common.spec(H, C, t=0)
    in_specs = [rows(Kp), rows(Kp), rows(Vp), g_spec, rows(C) if vec else common.spec(H, C, t=0),
                common.doc_spec(H, Tp), common.states_spec(H, N, Kp, Vp, n=0),
                common.states_spec(H, N, Kp, Vp, n=0), rows(Vp)]
    shp = lambda X, dt: jax.ShapeDtypeStruct((B, Tp, H) + X, dt)
    if vec:
        out_specs = [rows(Vp), rows(C), tile, tile, tile]
        out_shape = [shp((Vp,), v.dtype), shp((C,), f32), shp((Kp,), f32), shp((Kp,), f32),
                     shp((Kp,), f32)]
    else:
        per_tile = pl.BlockSpec((None, None, C, None), lambda bh, n, kb: (kb, bh // H, n, bh % H))
        out_specs = [rows(Vp), tile, tile, per_tile]
        out_shape = [shp((Vp,), v.dtype), shp((Kp,), q.dtype), shp((Kp,), k.dtype),
                     jax.ShapeDtypeStruct((NK, B, Tp, H), f32)]
    outs = pl.pallas_call(
        kernel, grid=(B * H, N, NK), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=triton_params(cfg, cfg.warps_bwd, cfg.stages_bwd),
        interpret=interpret(cfg), name="decay_backward",
    )(q, k, v, G, G if A is None else A, doc, hs, dhs, do)
    if not vec:
        outs = (*outs[:3], jnp.sum(outs[3], axis=0))
    return outs


@functools.cache
def _core(cfg, kind, has_seg, scale):
    """custom_vjp of (q, k, v, G, doc, h0) -> (o, S_final) on padded inputs, one static setup."""
    kw = dict(cfg=cfg, kind=kind, has_seg=has_seg)
    sdt = lambda x: f32 if x.dtype == f32 else x.dtype

    def fwd(q, k, v, G, doc, h0, residuals=True):
        B, Tp, H, _ = q.shape
        A = intra.intra_forward(q, k, G, doc, scale=scale, **kw) if kind == "vector" else None
        if fused.use_fused(B * H, Tp, v.shape[-1], cfg, residuals):
            o, S, *hs = fused.forward(q, k, v, G, doc, h0, A=A, scale=scale, residuals=residuals,
                                      **kw)
            return (o, S), (q, k, v, G, doc, hs[0] if hs else None, A)
        hs, S = state_pass(k, v, G, doc, h0, reverse=False, scale=1.0, state_dtype=sdt(q), **kw)
        o = output(q, k, v, G, A, doc, hs, scale=scale, **kw)
        return (o, S), (q, k, v, G, doc, hs, A)

    def bwd(res, cts):
        q, k, v, G, doc, hs, A = res
        do, dS = cts
        dhs, dh0 = state_pass(q, do.astype(v.dtype), G, doc, dS, reverse=True, scale=scale,
                              state_dtype=sdt(q), **kw)
        outs = _backward_main(q, k, v, G, A, doc, hs, dhs, do.astype(v.dtype), scale=scale, **kw)
        if kind == "vector":
            dv, dA, dq_p, dk_p, dG_p = outs
            dq, dk, dG = intra.intra_backward(q, k, G, dA, dq_p, dk_p, dG_p, scale=scale, **kw)
        else:
            dv, dq, dk, dG = outs
        return dq, dk, dv, dG, None, dh0

    f = jax.custom_vjp(lambda *a: fwd(*a, residuals=False)[0])
    f.defvjp(fwd, bwd)
    return f


def decay(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry (the chunk impls' signature): returns (o in v's dtype, S float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = (config or TritonChunkConfig.default()).for_chunk(chunk_size)
    C = cfg.chunk
    Tp, Kp, Vp, pad = common.padded_inputs(q, k, v, C)
    kind = "none" if g is None else ("scalar" if g.ndim == 3 else "vector")
    if kind == "none":
        G = jnp.zeros((B, Tp, H), f32)
    else:
        gp = pad_time(g.astype(f32), Tp)
        if kind == "vector":
            gp = jnp.pad(gp, ((0, 0),) * 3 + ((0, Kp - K),))
        G = jnp.cumsum(gp.reshape((B, Tp // C, C) + gp.shape[2:]), axis=2).reshape(gp.shape)
    has_seg = segment_ids is not None
    doc = (pad_time(doc_index(segment_ids), Tp, mode="edge") if has_seg
           else jnp.zeros((B, Tp), jnp.int32))
    h0 = (jnp.zeros((B, H, Kp, Vp), f32) if initial_state is None else
          jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))))
    core = _core(cfg, kind, has_seg, float(scale))
    o, S = core(pad(q, Kp), pad(k, Kp), pad(v, Vp), G, doc.astype(jnp.int32), h0)
    return o[:, :T, :, :V].astype(v.dtype), S[:, :, :K, :V]
