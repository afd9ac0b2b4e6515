"""Pallas GPU kernels of the delta-rule family: DeltaNet, Gated DeltaNet and KDA.

Math and masks as `linear_jax.ops.common.delta_chunk` (q scaled; D, Gin, R, Gtot the gate spans of
`linear_jax.kernels.tiles`, each summed from exactly its gates):

    W, U  = UT transform of the chunk (`wy.ut_transform`, parallel over chunks)
    u     = U - W S_n
    S_n+1 = keep * exp(Gtot) S_n + sum_j (k_j exp(R_j) out_j) u_j^T
    o_i   = sum_{j<=i, same} exp(D_ij) (q_i . k_j) u_j + (q_i exp(Gin_i) in_i)^T S_n

The forward is the one-pass form (`fused.py`) where its grid fills the GPU and nothing is kept,
else the decay family's state pass run with y = U - W S (`chunk_state`: writes every entering S_n
and u) and the decay family's output kernel on u in place of v; both read the gates' prefix sums
for their factors (values only, `common`), while T = (I + L)^-1, whose L the backward's pair
gradients go through, is formed from the exact spans (`wy`).

Backward (`jax.custom_vjp`, kernels in `delta_bwd`): the reverse state pass, which also forms du and
every dS_n+1, then parallel kernels per chunk for dq, dk, dv, dbeta and dg, using the T = (I + L)^-1
and W the forward kept. dg is routed through the spans (`tiles.scalar_gate_grad`) from the pairs of
A and of L and the per-row terms of q_in, k_in, k_out and the chunk decay: exact at strong decay.

KDA (`ops.kda`) is the same recurrence with a per-channel gate g [B, T, H, K], taken the way GLA
extends simple GLA: exp(D) no longer factors out of the key sums, so both pair matrices, A = q k^T *
exp(D) * scale and Akk = k k^T * exp(D) (L = beta Akk), come from the decay family's sub-chunked
intra kernel (`intra.intra_forward`), are kept for the backward, and are read by the passes in
place of forming them; every per-row factor (e_in, e_out, a) is per channel. Their pair gradients
dA and dAkk = beta dL go back through `intra.intra_backward` (twice: the q-k pairs with the
per-row gate terms, then the k-k pairs), so dg is routed through exact spans as GLA's.
"""

from __future__ import annotations

import functools

from linear_jax.kernels.gpu import common, decay, delta_bwd, fused, intra, wy
from linear_jax.kernels.gpu.chunk_state import state_pass
from linear_jax.kernels.gpu.common import F32, Ctx


def _prefix(ctx, g):
    return g if ctx.kind == "none" else common.prefix_sums(g, ctx.C)


def _forward(ctx, q, k, v, g, beta, h0, doc, *, scale, residuals):
    B, Tp, H, _ = q.shape
    G = _prefix(ctx, g)
    A = Akk = None
    if ctx.kind == "vector":
        A = intra.intra_forward(ctx, q, k, G, doc, scale=scale)
        Akk = intra.intra_forward(ctx, k, k, G, doc, scale=1.0)
    if fused.use_fused(B * H, Tp, v.shape[-1], ctx.cfg, residuals):
        Tm = wy.inverse(ctx, k, beta, g, doc, Akk)
        o, S, *res = fused.forward(ctx, q, k, v, G, doc, h0, scale=scale, A=A, Tm=Tm, beta=beta,
                                   residuals=residuals)
        hs, u, W = res if residuals else (None,) * 3
        return (o, S), (hs, u, W, Tm, A, Akk)
    W, U, Tm = wy.ut_transform(ctx, k, v, beta, g, G, doc, Akk)
    hs, u, S = state_pass(ctx, k, U, G, doc, h0, reverse=False, k=k, W=W, y_dtype=v.dtype,
                          state_dtype=F32 if ctx.f32 else k.dtype)
    o = decay.output(ctx, q, k, u, G, A, doc, hs, scale=scale)
    return (o, S), (hs, u, W, Tm, A, Akk)


@functools.cache
def _core(ctx: Ctx, scale: float):
    """custom_vjp of (q, k, v, g, beta, h0, doc) -> (o, S_final) on padded inputs."""

    def fwd(q, k, v, g, beta, h0, doc, residuals):
        out, res = _forward(ctx, q, k, v, g, beta, h0, doc, scale=scale, residuals=residuals)
        return out, (q, k, v, g, beta, doc, *res)

    def bwd(res, cts):
        q, k, v, g, beta, doc, hs, u, W, Tm, A, Akk = res
        do, dS = cts
        do = do.astype(v.dtype)
        G = _prefix(ctx, g)
        dhs, du, dh0 = state_pass(ctx, q, do, G, doc, dS, reverse=True, scale=scale, k=k, W=W,
                                  y_dtype=common.half_dtype(q.dtype), state_dtype=hs.dtype, A=A)
        dq, dk, dv, dbeta, dg = delta_bwd.backward(ctx, q, k, v, beta, g, G, doc, hs, dhs, u, du,
                                                   do, W, Tm, Akk, scale=scale)
        return dq, dk, dv, dg, dbeta, dh0, None

    return common.custom_vjp(fwd, bwd)


def delta(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry of delta_rule (g None), gated_delta_rule (g [B, T, H]) and kda (g
    [B, T, H, K]), heads expanded, plus the kernel config (the registry always passes one; None
    takes `TritonChunkConfig.default()`): (o in v's dtype, S float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    p, doc, ctx, gp = common.gated_entry(q, v, g, segment_ids, chunk_size, config)
    o, S = _core(ctx, float(scale))(p(q, p.Kp), p(k, p.Kp), p(v, p.Vp), gp, p.scalars(beta),
                                    p.state(initial_state, B, H, K, V), doc)
    return o[:, :T, :, :V].astype(v.dtype), S[:, :, :K, :V]
