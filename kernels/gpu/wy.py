"""The UT (WY) transform of the delta-rule family, one chunk per program, as a Pallas kernel.

Inside a chunk (G the chunk-local cumulative gate, Gamma_ij = exp(G_i - G_j) for j <= i in one
document, see `linear_jax.ops.common.delta_chunk`):

    L = strictly_lower(diag(beta) (K K^T * Gamma)),   T = (I + L)^{-1}
    W = T diag(beta) (K * exp(G) * in_rows),          U = T diag(beta) V

T is formed over sub-chunks of c rows. The diagonal blocks D = diag_a (I + L_aa)^{-1} by forward
substitution, all s = C / c blocks at once: step i sets row i of every block, D <- D + P_i (I - D)
- (P_i L_d) D with P_i the projector on rows i, c + i, ... and L_d the block-diagonal part of L, so
each of the c sequential steps is one [C, C] masked matmul rather than c steps per block. Then, with
L_o the strictly block-lower rest and M = D L_o (block-nilpotent: M^s = 0),

    T = (I + L)^{-1} = (I + M)^{-1} D = (I - M)(I + M^2)(I + M^4)... D      (log2(s) factors)

the block forward substitution regrouped as whole-chunk matmuls. No power of L itself is formed
(whose entries can reach C(C, m) for correlated keys), only powers of the block-scaled M, whose
nilpotency index is s, and no exp(-G). Two kernels, both over grid (B*H, N): `delta_ut_inverse`
forms T, `delta_ut_apply` reads it back as one [C, C] tile for W and U (the two-pass forward; the
one-pass forward of `fused.py` applies T itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params

f32 = jnp.float32


def ut_transform(k, v, beta, G, doc, *, cfg, gated, has_seg):
    """k [B,Tp,H,Kp], v [B,Tp,H,Vp], beta [B,Tp,H] float32, G [B,Tp,H] float32 (used if gated),
    doc [B,Tp] int32. Returns W [B,Tp,H,Kp] (`common.half_dtype`), and U [B,Tp,H,Vp] and
    T [B,Tp,H,C] (kept for the backward) in float32."""
    Tm = inverse(k, beta, G, doc, cfg=cfg, gated=gated, has_seg=has_seg)
    W, U = _apply(k, v, beta, G, doc, Tm, cfg=cfg, gated=gated, has_seg=has_seg)
    return W, U, Tm


def inverse(k, beta, G, doc, *, cfg, gated, has_seg):
    """T = (I + L)^{-1} of every chunk, [B, Tp, H, C] float32."""
    B, Tp, H, Kp = k.shape
    C, c = cfg.chunk, cfg.sub_chunk
    s, exact = C // c, k.dtype == f32
    # float32 inputs: float32-accurate products (3xTF32); bf16/fp16 inputs: tf32, whose rounding
    # (2^-11) stays below the inputs' own
    prec = dict(split_tf32=exact, interpret=interpret(cfg))

    def kernel(k_ref, b_ref, g_ref, doc_ref, t_ref):
        n = pl.program_id(1)
        r = jnp.arange(C, dtype=jnp.int32)
        mask = r[:, None] > r[None, :]
        if has_seg:
            d = doc_ref[pl.ds(n * C, C)]
            mask = mask & (d[:, None] == d[None, :])
        k = k_ref[...]
        L = dot(k, k, tb=True, exact=exact) * b_ref[...][:, None]
        if gated:
            G = g_ref[...][:, None]
            L = L * jnp.exp(jnp.where(mask, G - G.reshape(1, C), -jnp.inf))
        L = jnp.where(mask, L, 0.0)
        diag_block = (r[:, None] // c) == (r[None, :] // c)
        eye = jnp.where(r[:, None] == r[None, :], 1.0, 0.0)

        def row(i, D):                          # row i of every diagonal block
            on = (r % c == i)[:, None]
            Li = jnp.where(on & diag_block, L, 0.0)
            return jnp.where(on, eye, D) - dot(Li, D, **prec)

        D = jax.lax.fori_loop(0, c, row, jnp.zeros((C, C), f32))
        M = dot(D, jnp.where(diag_block, 0.0, L), **prec)
        T = D - dot(M, D, **prec)       # (I - M) D
        P = M
        for _ in range((s - 1).bit_length() - 1):  # (I + M^2)(I + M^4)...: M^s = 0
            P = dot(P, P, **prec)
            T = T + dot(P, T, **prec)
        t_ref[...] = T

    rows = lambda X: common.spec(H, C, X, t=0)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), common.spec(H, C, t=0), common.spec(H, C, t=0),
                  common.doc_spec(H, Tp)],
        out_specs=rows(C),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), f32),
        compiler_params=triton_params(cfg, cfg.warps_out, 1),
        interpret=interpret(cfg), name="delta_ut_inverse",
    )(k, beta, G, doc)


def _apply(k, v, beta, G, doc, Tm, *, cfg, gated, has_seg):
    B, Tp, H, Kp = k.shape
    Vp, C = v.shape[-1], cfg.chunk
    BV, exact = common.value_block(Vp, cfg.block_v_out), k.dtype == f32

    def kernel(k_ref, v_ref, b_ref, g_ref, doc_ref, t_ref, w_ref, u_ref):
        n = pl.program_id(1)
        Tm, beta = t_ref[...], b_ref[...][:, None]
        x = k_ref[...].astype(f32) * beta                    # beta k_in
        if gated:
            x = x * jnp.exp(g_ref[...][:, None])
        if has_seg:
            in_rows = doc_ref[pl.ds(n * C, C)] == doc_ref[jnp.maximum(n * C - 1, 0)]
            x = jnp.where(in_rows[:, None], x, 0.0)
        w_ref[...] = dot(Tm, x, exact=exact).astype(w_ref.dtype)
        for vb in range(Vp // BV):
            cols = pl.ds(vb * BV, BV)
            u_ref[:, cols] = dot(Tm, v_ref[:, cols].astype(f32) * beta, exact=exact)

    rows = lambda X: common.spec(H, C, X, t=0)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), rows(Vp), common.spec(H, C, t=0), common.spec(H, C, t=0),
                  common.doc_spec(H, Tp), rows(C)],
        out_specs=[rows(Kp), rows(Vp)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(k.dtype)),
                   jax.ShapeDtypeStruct((B, Tp, H, Vp), f32)],
        compiler_params=triton_params(cfg, cfg.warps_out, cfg.stages_out),
        interpret=interpret(cfg), name="delta_ut_apply",
    )(k, v, beta, G, doc, Tm)
