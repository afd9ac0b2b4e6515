"""Pallas GPU kernels of the delta-rule family: DeltaNet and Gated DeltaNet.

Math and masks as `linear_jax.ops.common.delta_chunk` (q scaled, G the chunk-local cumulative gate):

    W, U  = UT transform of the chunk (`wy.ut_transform`, parallel over chunks)
    u     = U - W S_n
    S_n+1 = keep * exp(G_last) S_n + sum_j (k_j exp(G_last - G_j) out_j) u_j^T
    o_i   = sum_{j<=i, same} Gamma_ij (q_i . k_j) u_j + (q_i exp(G_i) in_i)^T S_n

The state pass (grid (B*H, V/BV), all of K per program since u needs W S over K) writes every
entering S_n and u; the output is the decay family's output kernel run on u in place of v.

Backward (`jax.custom_vjp`, kernels in `delta_bwd`): a reverse state pass that forms du and every
dS_n+1, then one parallel kernel per chunk for dq, dk, dv, dbeta and dG, using the T = (I + L)^-1
and W the forward kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import common, decay, delta_bwd, fused, wy
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params
from linear_jax.ops.common.chunking import doc_index, pad_time

f32 = jnp.float32


def _state_pass(k, W, U, G, doc, S0, *, cfg, gated, has_seg, u_dtype):
    B, Tp, H, Kp = k.shape
    Vp, C = U.shape[-1], cfg.chunk
    N, BV = Tp // C, common.state_tiles(B * H, Kp, Vp, cfg, split_k=False, min_bv=32)[1]
    exact = k.dtype == f32

    def kernel(k_ref, w_ref, uu_ref, g_ref, doc_ref, s0_ref, hs_ref, u_ref, send_ref):
        def step(n, S):
            hs_ref[n] = S.astype(hs_ref.dtype)
            rows = pl.ds(n * C, C)
            u = uu_ref[rows, :] - dot(w_ref[rows, :].astype(f32), S, exact=exact)
            u_ref[rows, :] = u.astype(u_ref.dtype)
            kn = k_ref[rows, :].astype(f32)
            decay_ = jnp.float32(1.0)
            if gated:
                Gl = g_ref[n * C + C - 1]
                kn = kn * jnp.exp(Gl - g_ref[rows][:, None])
                decay_ = jnp.exp(Gl)
            if has_seg:
                _, out_rows, keep, _ = common.chunk_masks(doc_ref, n, C, False)
                kn = jnp.where(out_rows[:, None], kn, 0.0)
                decay_ = jnp.where(keep, decay_, 0.0)
            return decay_ * S + dot(kn, u, ta=True, exact=exact)

        send_ref[...] = jax.lax.fori_loop(0, N, step, s0_ref[...])

    seq = lambda X, x=None: common.spec(H, Tp, X, x=x)
    return pl.pallas_call(
        kernel, grid=(B * H, Vp // BV),
        in_specs=[seq(Kp), seq(Kp), seq(BV, 0), common.spec(H, Tp), common.doc_spec(H, Tp),
                  common.state_spec(H, Kp, BV, v=0)],
        out_specs=[common.states_spec(H, N, Kp, BV, v=0), seq(BV, 0),
                   common.state_spec(H, Kp, BV, v=0)],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, Kp, Vp), f32 if exact else k.dtype),
                   jax.ShapeDtypeStruct((B, Tp, H, Vp), u_dtype),
                   jax.ShapeDtypeStruct((B, H, Kp, Vp), f32)],
        compiler_params=triton_params(cfg, cfg.warps_state, cfg.stages_state),
        interpret=interpret(cfg), name="delta_state_fwd",
    )(k, W, U, G, doc, S0)


def _forward(q, k, v, G, beta, h0, doc, *, cfg, gated, has_seg, scale, residuals=True):
    B, Tp, H, _ = q.shape
    if fused.use_fused(B * H, Tp, v.shape[-1], cfg, residuals):
        Tm = wy.inverse(k, beta, G, doc, cfg=cfg, gated=gated, has_seg=has_seg)
        o, S, *res = fused.forward(q, k, v, G, doc, h0, cfg=cfg, scale=scale, Tm=Tm, beta=beta,
                                   kind="gated_delta" if gated else "delta", has_seg=has_seg,
                                   residuals=residuals)
        hs, u, W = res if residuals else (None,) * 3
        return (o, S), (hs, u, W, Tm)
    W, U, Tm = wy.ut_transform(k, v, beta, G, doc, cfg=cfg, gated=gated, has_seg=has_seg)
    hs, u, S = _state_pass(k, W, U, G, doc, h0, cfg=cfg, gated=gated, has_seg=has_seg,
                           u_dtype=v.dtype)
    o = decay.output(q, k, u, G, None, doc, hs, cfg=cfg, kind="scalar" if gated else "none",
                      has_seg=has_seg, scale=scale)
    return (o, S), (hs, u, W, Tm)


@functools.cache
def _core(cfg, has_seg, scale, gated):
    """custom_vjp of (q, k, v, G, beta, h0, doc) -> (o, S_final) on padded inputs."""
    kw = dict(cfg=cfg, gated=gated, has_seg=has_seg, scale=scale)

    def fwd(q, k, v, G, beta, h0, doc):
        out, (hs, u, W, Tm) = _forward(q, k, v, G, beta, h0, doc, **kw)
        return out, (q, k, v, G, beta, doc, hs, u, W, Tm)

    def bwd(res, cts):
        q, k, v, G, beta, doc, hs, u, W, Tm = res
        do, dS = cts
        do = do.astype(v.dtype)
        dhs, du, dh0 = delta_bwd.state_bwd(q, k, do, G, doc, W, dS, state_dtype=hs.dtype, **kw)
        dq, dk, dv, dbeta, dG = delta_bwd.backward(q, k, v, beta, G, doc, hs, dhs, u, du, do, W,
                                                   Tm, **kw)
        return dq, dk, dv, dG, dbeta, dh0, None

    f = jax.custom_vjp(lambda *a: _forward(*a, **kw, residuals=False)[0])
    f.defvjp(fwd, bwd)
    return f


def delta(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry of delta_rule (g None) and gated_delta_rule: (o in v's dtype, S)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = (config or TritonChunkConfig.default()).for_chunk(chunk_size)
    C = cfg.chunk
    Tp, Kp, Vp, pad = common.padded_inputs(q, k, v, C)
    has_seg = segment_ids is not None
    doc = (pad_time(doc_index(segment_ids), Tp, mode="edge") if has_seg
           else jnp.zeros((B, Tp), jnp.int32)).astype(jnp.int32)
    h0 = (jnp.zeros((B, H, Kp, Vp), f32) if initial_state is None else
          jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))))
    G = jnp.zeros((B, Tp, H), f32)
    if g is not None:  # chunk-local cumulative gate; XLA's autodiff turns dG into dg
        G = jnp.cumsum(pad_time(g.astype(f32), Tp).reshape(B, Tp // C, C, H), 2).reshape(B, Tp, H)
    core = _core(cfg, has_seg, float(scale), g is not None)
    o, S = core(pad(q, Kp), pad(k, Kp), pad(v, Vp), G, pad_time(beta.astype(f32), Tp), h0, doc)
    return o[:, :T, :, :V].astype(v.dtype), S[:, :, :K, :V]
