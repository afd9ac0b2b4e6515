"""The UT (WY) transform of the delta-rule family, one chunk per program, as a Pallas kernel.

Inside a chunk (G the chunk-local cumulative gate, Gamma_ij = exp(G_i - G_j) for j <= i in one
document, see `linear_jax.ops.common.delta_chunk`):

    L = strictly_lower(diag(beta) (K K^T * Gamma)),   T = (I + L)^{-1}
    W = T diag(beta) (K * exp(G) * in_rows),          U = T diag(beta) V

T is formed by blocked forward substitution over sub-chunks of c rows: each diagonal block
T_aa = (I + L_aa)^{-1} row by row (T_i = e_i - sum_{j<i} L_ij T_j, c sequential steps on a [c, c]
tile), then the blocks below it, T_ab = -T_aa sum_{b<=m<a} L_am T_mb, as small matmuls. Only the
products a triangular solve forms are formed: no power of L (whose entries can reach C(C, m) for
correlated keys) and no exp(-G). Two kernels, both over grid (B*H, N): `delta_ut_inverse` forms T
from 16-row blocks, `delta_ut_apply` reads T back as one [C, C] tile for W and U as full-chunk
matmuls (small [c, c] products run far below the matrix units' rate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from linear_jax.kernels._compat import dot, interpret, pl, triton_params
from linear_jax.kernels.gpu import common

f32 = jnp.float32


def _invert_unit_lower(L, c):
    """(I + L)^{-1} for a strictly lower [c, c] L, one row per step."""
    r = jnp.arange(c, dtype=jnp.int32)

    def row(i, Tm):
        Li = jnp.sum(jnp.where(r[:, None] == i, L, 0.0), axis=0)              # L[i, :]
        new = jnp.where(r == i, 1.0, 0.0) - jnp.sum(Li[:, None] * Tm, axis=0)
        return jnp.where(r[:, None] == i, new[None, :], Tm)

    return jax.lax.fori_loop(0, c, row, jnp.zeros((c, c), f32))


def ut_transform(k, v, beta, G, doc, *, cfg, gated, has_seg):
    """k [B,Tp,H,Kp], v [B,Tp,H,Vp], beta [B,Tp,H] float32, G [B,Tp,H] float32 (used if gated),
    doc [B,Tp] int32. Returns W [B,Tp,H,Kp], U [B,Tp,H,Vp] and T [B,Tp,H,C] (kept for the
    backward), float32."""
    Tm = inverse(k, beta, G, doc, cfg=cfg, gated=gated, has_seg=has_seg)
    W, U = _apply(k, v, beta, G, doc, Tm, cfg=cfg, gated=gated, has_seg=has_seg)
    return W, U, Tm


def inverse(k, beta, G, doc, *, cfg, gated, has_seg):
    """T = (I + L)^{-1} of every chunk, [B, Tp, H, C] float32."""
    B, Tp, H, Kp = k.shape
    C, c = cfg.chunk, cfg.sub_chunk
    s, exact = C // c, k.dtype == f32

    def kernel(k_ref, b_ref, g_ref, doc_ref, t_ref):
        n = pl.program_id(1)
        r = jnp.arange(c, dtype=jnp.int32)
        blk = lambda ref, a: ref[pl.ds(a * c, c)]
        ks = [k_ref[pl.ds(a * c, c), :] for a in range(s)]
        betas = [blk(b_ref, a)[:, None] for a in range(s)]
        Gs = [blk(g_ref, a)[:, None] for a in range(s)] if gated else None
        docs = [doc_ref[pl.ds(n * C + a * c, c)] for a in range(s)] if has_seg else None

        def L_block(a, m):  # L_am, rows of sub-chunk a, columns of sub-chunk m <= a
            mask = r[:, None] > r[None, :] if a == m else jnp.ones((c, c), bool)
            if has_seg:
                mask = mask & (docs[a][:, None] == docs[m][None, :])
            x = dot(ks[a], ks[m], tb=True, exact=exact) * betas[a]
            if gated:
                x = x * jnp.exp(jnp.where(mask, Gs[a] - Gs[m].reshape(1, c), -jnp.inf))
            return jnp.where(mask, x, 0.0)

        L = {(a, m): L_block(a, m) for a in range(s) for m in range(a + 1)}
        T = {}
        for a in range(s):
            T[a, a] = _invert_unit_lower(L[a, a], c)
            for b in range(a - 1, -1, -1):
                acc = jnp.zeros((c, c), f32)
                for m in range(b, a):
                    acc += dot(L[a, m], T[m, b], exact=True)
                T[a, b] = -dot(T[a, a], acc, exact=True)
        for a in range(s):
            for b in range(s):
                t_ref[pl.ds(a * c, c), pl.ds(b * c, c)] = (T[a, b] if b <= a
                                                           else jnp.zeros((c, c), f32))

    rows = lambda X: common.spec(H, C, X, t=0)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), common.spec(H, C, t=0), common.spec(H, C, t=0),
                  common.doc_spec(H, Tp)],
        out_specs=rows(C),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), f32),
        compiler_params=triton_params(cfg.warps_out, 1),
        interpret=interpret(), name="delta_ut_inverse",
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
        w_ref[...] = dot(Tm, x, exact=exact)
        for vb in range(Vp // BV):
            cols = pl.ds(vb * BV, BV)
            u_ref[:, cols] = dot(Tm, v_ref[:, cols].astype(f32) * beta, exact=exact)

    rows = lambda X: common.spec(H, C, X, t=0)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), rows(Vp), common.spec(H, C, t=0), common.spec(H, C, t=0),
                  common.doc_spec(H, Tp), rows(C)],
        out_specs=[rows(Kp), rows(Vp)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Kp), f32),
                   jax.ShapeDtypeStruct((B, Tp, H, Vp), f32)],
        compiler_params=triton_params(cfg.warps_out, cfg.stages_out),
        interpret=interpret(), name="delta_ut_apply",
    )(k, v, beta, G, doc, Tm)
