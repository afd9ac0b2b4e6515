"""The chunked forward in one pass: state recurrence and output together, for every chunk op.

One program per (batch * head, value tile) walks the chunks in order, carrying the float32 state
tile S [K, BV] in registers, and per chunk n (q scaled, G the chunk-local cumulative gate, masks as
`common.chunk_masks`):

    y     = v                                   (decay family)
    y     = T (beta v) - W S,  W = T (beta k_in)  (delta rule: u, with T = (I + L)^-1 given)
    o     = A y + (q exp(G) in)^T S              A = q k^T * Gamma (scalar / no gate) or given
    S    <- keep exp(G_last) S + (k exp(G_last - G) out)^T y

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
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params

f32 = jnp.float32


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


def forward(q, k, v, G, doc, S0, *, cfg, kind, has_seg, scale, A=None, Tm=None, beta=None,
            residuals=False):
    """q, k [B,Tp,H,Kp]; v [B,Tp,H,Vp]; G [B,Tp,H(,Kp)] float32; doc [B,Tp]; S0 [B,H,Kp,Vp] f32.

    kind: "none" | "scalar" | "vector" (A [B,Tp,H,C] given) | "delta" | "gated_delta" (Tm
    [B,Tp,H,C] and beta [B,Tp,H] given). Returns (o, S_end) and, with `residuals`, the entering
    states [B,H,N,Kp,Vp] (plus u [B,Tp,H,Vp] and W [B,Tp,H,Kp], `common.half_dtype`, for the
    delta rule).
    """
    B, Tp, H, Kp = q.shape
    Vp, C = v.shape[-1], cfg.chunk
    N, BV = Tp // C, value_tile(B * H, Vp, cfg)
    exact, cd = q.dtype == f32, q.dtype
    is_delta = kind in ("delta", "gated_delta")
    gate = {"delta": "none", "gated_delta": "scalar"}.get(kind, kind)

    def kernel(q_ref, k_ref, v_ref, g_ref, x_ref, b_ref, doc_ref, s0_ref, o_ref, send_ref, *res):
        first_tile = pl.program_id(1) == 0
        causal = common.causal(C)

        def step(n, S):
            rows = pl.ds(n * C, C)
            q, k = q_ref[rows, :], k_ref[rows, :]
            mask, w_in, w_out = causal, jnp.ones((C, 1), f32), jnp.ones((C, 1), f32)
            decay = jnp.float32(1.0)
            if gate == "vector":
                Gn, Gl = g_ref[rows, :], g_ref[pl.ds(n * C + C - 1, 1), :]
                w_in, w_out, decay = jnp.exp(Gn), jnp.exp(Gl - Gn), jnp.exp(Gl).reshape(Kp, 1)
            elif gate == "scalar":
                Gn, Gl = g_ref[rows][:, None], g_ref[n * C + C - 1]
                w_in, w_out, decay = jnp.exp(Gn), jnp.exp(Gl - Gn), jnp.exp(Gl)
            if has_seg:
                in_rows, out_rows, keep, same = common.chunk_masks(doc_ref, n, C, True)
                mask = mask & same
                w_in = jnp.where(in_rows[:, None], w_in, 0.0)
                w_out = jnp.where(out_rows[:, None], w_out, 0.0)
                decay = jnp.where(keep, decay, 0.0)
            Amat = (x_ref[rows, :] if gate == "vector" else
                    common.intra_scalar(q, k, Gn if gate == "scalar" else None, mask, scale, exact))
            if is_delta:
                Tn, bn = x_ref[rows, :], b_ref[rows][:, None]
                W = dot(Tn, k.astype(f32) * (bn * w_in), exact=exact)
                y = dot(Tn, v_ref[rows, :].astype(f32) * bn, exact=exact) - dot(W, S, exact=exact)
                if residuals:
                    res[1][rows, :] = y.astype(res[1].dtype)

                    @pl.when(first_tile)
                    def _():
                        res[2][rows, :] = W.astype(res[2].dtype)
            else:
                y = v_ref[rows, :]
            if residuals:
                res[0][n] = S.astype(res[0].dtype)
            yc = y.astype(cd)
            qh = (q.astype(f32) * (scale * w_in)).astype(cd)
            o = dot(Amat.astype(cd), yc, exact=exact) + dot(qh, S.astype(cd), exact=exact)
            o_ref[rows, :] = o.astype(o_ref.dtype)
            kh = k.astype(f32) * w_out
            if is_delta:  # u and the keys in float32, as the two-kernel state pass
                return decay * S + dot(kh, y, ta=True, exact=exact)
            return decay * S + dot(kh.astype(cd), yc, ta=True, exact=exact)

        send_ref[...] = jax.lax.fori_loop(0, N, step, s0_ref[...].astype(f32))

    seq = lambda X, x=None: common.spec(H, Tp, X, x=x)
    zeros = lambda: jnp.zeros((B, Tp, H), f32)
    g_spec = seq(Kp) if gate == "vector" else common.spec(H, Tp)
    x = A if gate == "vector" else Tm
    in_specs = [seq(Kp), seq(Kp), seq(BV, 0), g_spec,
                seq(C) if x is not None else common.spec(H, Tp), common.spec(H, Tp),
                common.doc_spec(H, Tp), common.state_spec(H, Kp, BV, v=0)]
    out_specs = [seq(BV, 0), common.state_spec(H, Kp, BV, v=0)]
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, Vp), v.dtype),
                 jax.ShapeDtypeStruct((B, H, Kp, Vp), f32)]
    if residuals:
        out_specs.append(common.states_spec(H, N, Kp, BV, v=0))
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, Kp, Vp), cd))   # as the state pass
        if is_delta:
            out_specs += [seq(BV, 0), seq(Kp)]
            out_shape += [jax.ShapeDtypeStruct((B, Tp, H, Vp), v.dtype),
                          jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(q.dtype))]
    return pl.pallas_call(
        kernel, grid=(B * H, Vp // BV), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=triton_params(cfg, cfg.warps_fused, cfg.stages_fused),
        interpret=interpret(cfg), name=f"{kind}_fused_fwd",
    )(q, k, v, G, zeros() if x is None else x, zeros() if beta is None else beta, doc, S0)
