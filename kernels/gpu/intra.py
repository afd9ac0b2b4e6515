"""Intra-chunk blocks of the vector-gated (GLA) decay: A forward, dq/dk/dG backward.

    A_ij = scale * sum_k q_ik k_jk exp(G_ik - G_jk),   j <= i in one document

exp(G_i - G_j) cannot be split through one reference point of the chunk without a factor > 1 that
overflows at strong decay, so the chunk is cut into sub-chunks of c rows (the GLA paper's secondary
chunking). A block of queries a and keys b < a factors through the gate at the end of sub-chunk b,
R = G_{end b}: exp(G_i - R) * exp(R - G_j), both <= 1, one matmul. A diagonal block is summed
elementwise in K one key column at a time (c steps on a [c, K] tile). Every pair is therefore
computed with exponents <= 0 only. The backward runs the same blocks on dA = (do v^T) * mask:

    dq_i = scale * sum_j dA_ij k_j exp(G_i - G_j),   dk_j = scale * sum_i dA_ij q_i exp(G_i - G_j)

and adds the inter-chunk parts from `decay._backward_main`, with dG = q * dq - k * dk (+ the inter
part that already holds the chunk-last-row terms). Grid (B*H, N, C/c): each program owns the c rows
of one sub-chunk (its row block of A; its dq, dk, dG), and loops (not unrolled) over the blocks
it needs, so the kernels stay small and the programs many.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from linear_jax.kernels._compat import dot, interpret, pl, triton_params
from linear_jax.kernels.gpu import common

f32 = jnp.float32


def _sub_rows(H, c, s, X):
    """[B, T, H, X] blocks of the c rows of sub-chunk a = g[1] of chunk n = g[0]."""
    return pl.BlockSpec((None, c, None, X), lambda bh, n, a: (bh // H, n * s + a, bh % H, 0))


def _chunk_rows(H, C, X):
    return pl.BlockSpec((None, C, None, X), lambda bh, n, a: (bh // H, n, bh % H, 0))


def intra_forward(q, k, G, doc, *, cfg, kind, has_seg, scale):
    """A [B, Tp, H, C] float32, masked (causal, same document) and scaled."""
    B, Tp, H, Kp = q.shape
    C, c = cfg.chunk, cfg.sub_chunk
    s, exact, cd = C // c, q.dtype == f32, q.dtype

    def kernel(q_ref, k_ref, g_ref, doc_ref, a_ref):
        n, a = pl.program_id(1), pl.program_id(2)
        r = jnp.arange(c, dtype=jnp.int32)
        rows_a = pl.ds(a * c, c)
        qa, Ga = q_ref[rows_a, :].astype(f32), g_ref[rows_a, :]
        da = doc_ref[pl.ds(n * C + a * c, c)] if has_seg else None

        def same_doc(blk, b):
            if not has_seg:
                return blk
            db = doc_ref[pl.ds(n * C + b * c, c)]
            return jnp.where(da[:, None] == db[None, :], blk, 0.0)

        def off_diagonal(b, carry):            # keys of sub-chunk b < a, through R = G_{end b}
            rows_b = pl.ds(b * c, c)
            R = g_ref[pl.ds(b * c + c - 1, 1), :]
            kb = (k_ref[rows_b, :].astype(f32) * jnp.exp(R - g_ref[rows_b, :])).astype(cd)
            blk = dot((qa * jnp.exp(Ga - R)).astype(cd), kb, tb=True, exact=exact)
            a_ref[:, pl.ds(b * c, c)] = same_doc(blk, b) * scale
            return carry

        jax.lax.fori_loop(0, a, off_diagonal, 0)

        def diagonal(j, blk):                   # key column j of the diagonal block
            t = pl.ds(a * c + j, 1)
            e = jnp.exp(jnp.where(r[:, None] >= j, Ga - g_ref[t, :], -jnp.inf))
            col = jnp.sum(qa * k_ref[t, :].astype(f32) * e, axis=1)
            return blk + jnp.where(r[None, :] == j, col[:, None], 0.0)

        blk = jax.lax.fori_loop(0, c, diagonal, jnp.zeros((c, c), f32))
        a_ref[:, pl.ds(a * c, c)] = same_doc(blk, a) * scale

        def above(b, carry):
            a_ref[:, pl.ds(b * c, c)] = jnp.zeros((c, c), f32)
            return carry

        jax.lax.fori_loop(a + 1, s, above, 0)

    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C, s),
        in_specs=[_chunk_rows(H, C, Kp)] * 3 + [common.doc_spec(H, Tp)],
        out_specs=_sub_rows(H, c, s, C),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), f32),
        compiler_params=triton_params(cfg.warps_intra, 1),
        interpret=interpret(), name="gla_intra_forward",
    )(q, k, G, doc)


def intra_backward(q, k, G, dA, dq_p, dk_p, dG_p, *, cfg, kind, has_seg, scale):
    """dq, dk (input dtypes) and dG (float32) from dA and the inter-chunk parts."""
    B, Tp, H, Kp = q.shape
    C, c = cfg.chunk, cfg.sub_chunk
    s, exact, cd = C // c, q.dtype == f32, q.dtype

    def kernel(q_ref, k_ref, g_ref, da_ref, dqp_ref, dkp_ref, dgp_ref, dq_ref, dk_ref, dg_ref):
        a = pl.program_id(2)
        r = jnp.arange(c, dtype=jnp.int32)
        rows_a = pl.ds(a * c, c)
        qa, ka = q_ref[rows_a, :].astype(f32), k_ref[rows_a, :].astype(f32)
        Ga = g_ref[rows_a, :]
        Ra = g_ref[pl.ds(a * c + c - 1, 1), :]

        def keys_before(b, dq):                 # queries a, keys b < a: dq_a
            rows_b = pl.ds(b * c, c)
            R = g_ref[pl.ds(b * c + c - 1, 1), :]
            kb = (k_ref[rows_b, :].astype(f32) * jnp.exp(R - g_ref[rows_b, :])).astype(cd)
            blk = da_ref[rows_a, rows_b].astype(cd)
            return dq + dot(blk, kb, exact=exact) * jnp.exp(Ga - R)

        def queries_after(b, dk):               # queries b > a, keys a: dk_a
            rows_b = pl.ds(b * c, c)
            qb = (q_ref[rows_b, :].astype(f32) * jnp.exp(g_ref[rows_b, :] - Ra)).astype(cd)
            blk = da_ref[rows_b, rows_a].astype(cd)
            return dk + dot(blk, qb, ta=True, exact=exact) * jnp.exp(Ra - Ga)

        def diagonal(j, carry):                 # column (key j) and row (query j) of the block
            dq, dk = carry
            t = pl.ds(a * c + j, 1)
            Gj = g_ref[t, :]
            col = da_ref[rows_a, t]                                     # dA[i, j], [c, 1]
            dq = dq + col * k_ref[t, :].astype(f32) * jnp.exp(
                jnp.where(r[:, None] >= j, Ga - Gj, -jnp.inf))
            row = da_ref[t, rows_a].reshape(c, 1)                      # dA[j, i], [c, 1]
            dk = dk + row * q_ref[t, :].astype(f32) * jnp.exp(
                jnp.where(r[:, None] <= j, Gj - Ga, -jnp.inf))
            return dq, dk

        zero = jnp.zeros((c, Kp), f32)
        dq = jax.lax.fori_loop(0, a, keys_before, zero)
        dk = jax.lax.fori_loop(a + 1, s, queries_after, zero)
        dq, dk = jax.lax.fori_loop(0, c, diagonal, (dq, dk))
        dq, dk = dq * scale, dk * scale
        dq_ref[...] = (dq + dqp_ref[...]).astype(dq_ref.dtype)
        dk_ref[...] = (dk + dkp_ref[...]).astype(dk_ref.dtype)
        dg_ref[...] = qa * dq - ka * dk + dgp_ref[...]

    chunk, sub = _chunk_rows(H, C, Kp), _sub_rows(H, c, s, Kp)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C, s),
        in_specs=[chunk] * 3 + [_chunk_rows(H, C, C)] + [sub] * 3,
        out_specs=[sub] * 3,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(q.shape, f32)],
        compiler_params=triton_params(cfg.warps_intra, 1),
        interpret=interpret(), name="gla_intra_backward",
    )(q, k, G, dA, dq_p, dk_p, dG_p)
