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

Where a chunk's whole decay is mild, the blocks and columns are not needed: when every channel's
gate summed over the chunk is >= -SPAN (the common case: logsigmoid gates / 16 sum to about -3 over
64 rows), exp(G_i - G_j) = exp(G_i) * exp(-G_j) with exp(G_i) in [exp(-SPAN), 1] and exp(-G_j) in
[1, exp(SPAN)], both far inside the operand type's range, so the row block is one matmul through
the chunk start (and dq, dk one each), with the same per-product rounding as the blocked form. The
test is made per chunk at run time; chunks with stronger decay take the blocked path above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params

f32 = jnp.float32


def span_limit(dtype) -> float:
    """Largest chunk decay (in log space) taken by the one-matmul path: exp(SPAN) and exp(-SPAN)
    stay normal numbers in the dot operands' type (float16's range is e^+-11)."""
    return 8.0 if dtype == jnp.float16 else 60.0


def _mild(g_ref, C, dtype):
    """The chunk's decay is mild: every channel's summed gate >= -span_limit."""
    return jnp.min(g_ref[pl.ds(C - 1, 1), :]) >= -span_limit(dtype)


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

        def diagonal(j, blk):                   # key column j of the diagonal block
            t = pl.ds(a * c + j, 1)
            e = jnp.exp(jnp.where(r[:, None] >= j, Ga - g_ref[t, :], -jnp.inf))
            col = jnp.sum(qa * k_ref[t, :].astype(f32) * e, axis=1)
            return blk + jnp.where(r[None, :] == j, col[:, None], 0.0)

        def above(b, carry):
            a_ref[:, pl.ds(b * c, c)] = jnp.zeros((c, c), f32)
            return carry

        def blocked():
            jax.lax.fori_loop(0, a, off_diagonal, 0)
            blk = jax.lax.fori_loop(0, c, diagonal, jnp.zeros((c, c), f32))
            a_ref[:, pl.ds(a * c, c)] = same_doc(blk, a) * scale
            jax.lax.fori_loop(a + 1, s, above, 0)

        def one_matmul():
            kf = (k_ref[...].astype(f32) * jnp.exp(-g_ref[...])).astype(cd)
            blk = dot((qa * jnp.exp(Ga)).astype(cd), kf, tb=True, exact=exact)
            mask = (a * c + r)[:, None] >= jnp.arange(C, dtype=jnp.int32)[None, :]
            if has_seg:
                mask = mask & (da[:, None] == doc_ref[pl.ds(n * C, C)][None, :])
            a_ref[...] = jnp.where(mask, blk, 0.0) * scale

        jax.lax.cond(_mild(g_ref, C, cd), one_matmul, blocked)

    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C, s),
        in_specs=[_chunk_rows(H, C, Kp)] * 3 + [common.doc_spec(H, Tp)],
        out_specs=_sub_rows(H, c, s, C),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), f32),
        compiler_params=triton_params(cfg, cfg.warps_intra, 1),
        interpret=interpret(cfg), name="gla_intra_forward",
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

        def blocked():
            zero = jnp.zeros((c, Kp), f32)
            dq = jax.lax.fori_loop(0, a, keys_before, zero)
            dk = jax.lax.fori_loop(a + 1, s, queries_after, zero)
            return jax.lax.fori_loop(0, c, diagonal, (dq, dk))

        def one_matmul():                       # dA is masked already
            G = g_ref[...]
            kf = (k_ref[...].astype(f32) * jnp.exp(-G)).astype(cd)
            qf = (q_ref[...].astype(f32) * jnp.exp(G)).astype(cd)
            dq = dot(da_ref[rows_a, :].astype(cd), kf, exact=exact) * jnp.exp(Ga)
            dk = dot(da_ref[:, rows_a].astype(cd), qf, ta=True, exact=exact) * jnp.exp(-Ga)
            return dq, dk

        dq, dk = jax.lax.cond(_mild(g_ref, C, cd), one_matmul, blocked)
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
        compiler_params=triton_params(cfg, cfg.warps_intra, 1),
        interpret=interpret(cfg), name="gla_intra_backward",
    )(q, k, G, dA, dq_p, dk_p, dG_p)
