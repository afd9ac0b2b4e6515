"""The chunked forward in one pass: state recurrence and output together, for every chunk op.

One program per (batch * head, value tile) walks the chunks in order (`chunk_state.sequential`),
carrying the float32 state tile S [K, BV] in registers, and per chunk n (q scaled; factors from
the gates' prefix sums and masks as `common.Chunk.prefix`):

    y     = v                                   (decay family)
    y     = T (beta v) - W S,  W = T (beta k e_in)  (delta rule: u, with T = (I + L)^-1 given)
    o     = A y + (q e_in)^T S                  A = q k^T * exp(D) (scalar / no gate) or given
                                                (vector gate: GLA, and KDA's delta rule)
    S    <- a S + (k e_out)^T y

so no per-chunk state reaches memory unless the backward asks for it (`residuals`: the entering
states S_n, and for the delta rule u and W). Against the two-kernel form (a state pass that writes
every S_n, then a parallel output kernel that reads them back), this drops the states' round trip:
at K = V = 128 and C = 64 each chunk's state is twice the size of its q. The price is parallelism:
B * H * V / BV programs, each sequential over T / C chunks, so `decay.py` and `delta.py` take this
form for the forward alone while that grid fills the GPU (`use_fused`), the two-kernel form
otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.chunk_state import gate_rows, row_stages, sequential
from linear_jax.kernels.gpu.common import F32, Chunk


def value_tile(BH: int, Vp: int, cfg: TritonChunkConfig) -> int:
    """The fused pass's value tile: cfg.block_v_fused, halved (>= 16) while the grid is short of
    cfg.min_programs."""
    BV = common.value_block(Vp, cfg.block_v_fused)
    while BH * (Vp // BV) < cfg.min_programs and BV > 16:
        BV //= 2
    return BV


def use_fused(BH: int, Tp: int, Vp: int, cfg: TritonChunkConfig, residuals: bool) -> bool:
    """The one-pass form for the forward alone, while a full value tile (cfg.block_v_fused) still
    gives a full grid. Measured on an H200 (benchmarks/results/ops_gpu_NVIDIA_H200_sweep*.json,
    bf16, H = 16, K = V = 128): simple_gla 0.18 vs 0.28 ms at T = 2048 (256 programs of 64
    values), but 0.44 vs 0.37 ms at T = 8192 and 1.26 vs 0.85 ms at T = 32768, where the grid is
    filled only by narrowing the tile (each program then recomputes q k^T for 16 values), and the
    delta rule 1.61 vs 1.00 ms at T = 8192; under differentiation, where it must also write every
    state, slower at every T (1.06 vs 0.96 ms forward + backward at T = 2048)."""
    if cfg.fused_fwd is not None:
        return cfg.fused_fwd
    full_tile = BH * (Vp // common.value_block(Vp, cfg.block_v_fused)) >= cfg.min_programs
    return not residuals and (full_tile or Tp // cfg.chunk <= 8)


def forward(ctx, q, k, v, G, doc, S0, *, scale, A=None, Tm=None, beta=None, residuals=False):
    """q, k [B,Tp,H,Kp]; v [B,Tp,H,Vp]; G [B,Tp,H(,Kp)] float32, the gates' prefix sums; doc
    [B,Tp]; S0 [B,H,Kp,Vp] float32.

    The gate kind is ctx.kind; A [B,Tp,H,C] is given for the vector gate; Tm [B,Tp,H,C] and beta
    [B,Tp,H] make it the delta rule (with a vector gate: KDA). Returns (o, S_end) and, with
    `residuals`, the entering states [B,H,N,Kp,Vp] (plus u [B,Tp,H,Vp] and W [B,Tp,H,Kp],
    `common.half_dtype`, for the delta rule)."""
    B, Tp, H, Kp = q.shape
    Vp, C, cfg = v.shape[-1], ctx.C, ctx.cfg
    N, BV = Tp // C, value_tile(B * H, Vp, cfg)
    cd, delta, vec = q.dtype, Tm is not None, ctx.kind == "vector"

    def step(n, carry, ins, outs, pids):
        (S,) = carry
        q_ref, k_ref, v_ref, g_ref, a_ref, t_ref, b_ref, doc_ref = ins
        o_ref, *res = outs
        rows = pl.ds(n * C, C)
        q, k = q_ref[rows, :], k_ref[rows, :]
        ch = Chunk(ctx, n, doc_ref)
        decay, e_in, e_out, a = gate_rows(ctx, ch, g_ref, n * C, pairs=not vec)
        Amat = a_ref[rows, :] if vec else ctx.dot(q, k, tb=True) * scale * decay
        if delta:
            Tn, bn = t_ref[rows, :], b_ref[rows][:, None]
            W = ctx.dot(Tn, k.astype(F32) * (bn * e_in))
            y = ctx.dot(Tn, v_ref[rows, :].astype(F32) * bn) - ctx.dot(W, S)
            if residuals:
                res[1][rows, :] = y.astype(res[1].dtype)

                @pl.when(pids[1] == 0)
                def _():
                    res[2][rows, :] = W.astype(res[2].dtype)
        else:
            y = v_ref[rows, :]
        if residuals:
            res[0][n] = S.astype(res[0].dtype)
        yc = y.astype(cd)
        qh = (q.astype(F32) * (scale * e_in)).astype(cd)
        o = ctx.dot(Amat.astype(cd), yc) + ctx.dot(qh, S.astype(cd))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        kh = k.astype(F32) * e_out
        if delta:  # u and the keys in float32, as the two-kernel state pass
            return (a * S + ctx.dot(kh, y, ta=True),)
        return (a * S + ctx.dot(kh.astype(cd), yc, ta=True),)

    seq = lambda X, x=None: common.spec(H, Tp, X, x=x)
    zeros = jnp.zeros((B, Tp, H), F32)
    pairs = lambda x: (zeros, common.spec(H, Tp)) if x is None else (x, seq(C))
    ins = [(q, seq(Kp)), (k, seq(Kp)), (v, seq(BV, 0)),
           (G, seq(Kp) if vec else common.spec(H, Tp)), pairs(A), pairs(Tm),
           (zeros if beta is None else beta, common.spec(H, Tp)),
           (doc, common.doc_spec(H, Tp))]
    outs = [(jax.ShapeDtypeStruct((B, Tp, H, Vp), v.dtype), seq(BV, 0))]
    if residuals:
        outs.append((jax.ShapeDtypeStruct((B, H, N, Kp, Vp), cd),    # as the state pass
                     common.states_spec(H, N, Kp, BV, v=0)))
        if delta:
            outs += [(jax.ShapeDtypeStruct((B, Tp, H, Vp), v.dtype), seq(BV, 0)),
                     (jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(cd)), seq(Kp))]
    kind = {"none": "delta", "scalar": "gated_delta", "vector": "kda"}[ctx.kind] if delta else (
        ctx.kind)
    stages = row_stages(cfg.stages_fused, Kp, ctx.split_dots)
    o, *res, S = sequential(ctx, step, ins=ins, carry=[(S0, common.state_spec(H, Kp, BV, v=0))],
                            outs=outs, grid=(B * H, Vp // BV), N=N, reverse=False,
                            warps=cfg.warps_fused, stages=stages,
                            name=f"{kind}_fused_fwd")
    return (o, S, *res)
