"""Intra-chunk blocks of the vector-gated (GLA) decay: A forward, dq/dk/dG backward.

    A_ij = scale * sum_k q_ik k_jk exp(G_ik - G_jk),   j <= i in one document

exp(G_i - G_j) cannot be split through one reference point of the chunk without a factor > 1 that
overflows at strong decay, so the chunk is cut into sub-chunks of c rows (the GLA paper's secondary
chunking). A block of queries a and keys b < a factors through the gate at the end of sub-chunk b,
R = G_{end b}: exp(G_i - R) * exp(R - G_j), both <= 1, one matmul. A diagonal block is summed
elementwise in K one key column at a time (c columns of [c, K]). Every pair is therefore computed
with exponents <= 0 only. The backward runs the same blocks on dA = (do v^T) * mask:

    dq_i = scale * sum_j dA_ij k_j exp(G_i - G_j),   dk_j = scale * sum_i dA_ij q_i exp(G_i - G_j)

and adds the inter-chunk parts from `decay._backward_main`, with dG = q * dq - k * dk (+ the inter
part that already holds the chunk-last-row terms). Grid (B*H, N); each program owns one chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from linear_jax.kernels._compat import dot, interpret, pl, triton_params
from linear_jax.kernels.gpu import common

f32 = jnp.float32


def _rows(ref, a, c):
    return ref[pl.ds(a * c, c), :]


def intra_forward(q, k, G, doc, *, cfg, kind, has_seg, scale):
    """A [B, Tp, H, C] float32, masked (causal, same document) and scaled."""
    B, Tp, H, Kp = q.shape
    C, c = cfg.chunk, cfg.sub_chunk
    s, exact, cd = C // c, q.dtype == f32, q.dtype
    def kernel(q_ref, k_ref, g_ref, doc_ref, a_ref):
        n = pl.program_id(1)
        r = jnp.arange(c, dtype=jnp.int32)
        for a in range(s):
            qa, Ga = _rows(q_ref, a, c).astype(f32), _rows(g_ref, a, c)
            da = doc_ref[pl.ds(n * C + a * c, c)] if has_seg else None
            for b in range(s):
                if b > a:
                    blk = jnp.zeros((c, c), f32)
                elif b < a:
                    R = g_ref[pl.ds(b * c + c - 1, 1), :]
                    kb = _rows(k_ref, b, c).astype(f32) * jnp.exp(R - _rows(g_ref, b, c))
                    blk = dot((qa * jnp.exp(Ga - R)).astype(cd), kb.astype(cd), tb=True,
                              exact=exact)
                else:
                    blk = jnp.zeros((c, c), f32)
                    for j in range(c):
                        kj = k_ref[pl.ds(a * c + j, 1), :].astype(f32)
                        e = jnp.exp(jnp.where(r[:, None] >= j, Ga - g_ref[pl.ds(a * c + j, 1), :],
                                              -jnp.inf))
                        col = jnp.sum(qa * kj * e, axis=1)
                        blk += jnp.where(r[None, :] == j, col[:, None], 0.0)
                if has_seg and b <= a:
                    db = doc_ref[pl.ds(n * C + b * c, c)]
                    blk = jnp.where(da[:, None] == db[None, :], blk, 0.0)
                a_ref[pl.ds(a * c, c), pl.ds(b * c, c)] = blk * scale

    rows = lambda X: common.spec(H, C, X, t=0)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), rows(Kp), rows(Kp), common.doc_spec(H, Tp)],
        out_specs=rows(C), out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), f32),
        compiler_params=triton_params(cfg.warps_intra, 1),
        interpret=interpret(), name="gla_intra_forward",
    )(q, k, G, doc)


def intra_backward(q, k, G, dA, dq_p, dk_p, dG_p, *, cfg, kind, has_seg, scale):
    """dq, dk (input dtypes) and dG (float32) from dA and the inter-chunk parts."""
    B, Tp, H, Kp = q.shape
    C, c = cfg.chunk, cfg.sub_chunk
    s, exact, cd = C // c, q.dtype == f32, q.dtype
    def kernel(q_ref, k_ref, g_ref, da_ref, dqp_ref, dkp_ref, dgp_ref, dq_ref, dk_ref, dg_ref):
        r = jnp.arange(c, dtype=jnp.int32)
        for a in range(s):
            qa, ka = _rows(q_ref, a, c).astype(f32), _rows(k_ref, a, c).astype(f32)
            Ga = _rows(g_ref, a, c)
            Ra = g_ref[pl.ds(a * c + c - 1, 1), :]
            dq, dk = jnp.zeros((c, Kp), f32), jnp.zeros((c, Kp), f32)
            for b in range(s):
                if b < a:   # queries a, keys b: dq_a
                    R = g_ref[pl.ds(b * c + c - 1, 1), :]
                    kb = _rows(k_ref, b, c).astype(f32) * jnp.exp(R - _rows(g_ref, b, c))
                    blk = da_ref[pl.ds(a * c, c), pl.ds(b * c, c)].astype(cd)
                    dq += dot(blk, kb.astype(cd), exact=exact) * jnp.exp(Ga - R)
                elif b > a:  # queries b, keys a: dk_a
                    qb = _rows(q_ref, b, c).astype(f32) * jnp.exp(_rows(g_ref, b, c) - Ra)
                    blk = da_ref[pl.ds(b * c, c), pl.ds(a * c, c)].astype(cd)
                    dk += dot(blk, qb.astype(cd), ta=True, exact=exact) * jnp.exp(Ra - Ga)
            for j in range(c):  # diagonal block, one column (key j) / row (query j) at a time
                t = pl.ds(a * c + j, 1)
                Gj = g_ref[t, :]
                col = da_ref[pl.ds(a * c, c), t]                            # dA[i, j], [c, 1]
                dq += col * k_ref[t, :].astype(f32) * jnp.exp(
                    jnp.where(r[:, None] >= j, Ga - Gj, -jnp.inf))
                row = da_ref[t, pl.ds(a * c, c)].reshape(c, 1)              # dA[j, i], [c, 1]
                dk += row * q_ref[t, :].astype(f32) * jnp.exp(
                    jnp.where(r[:, None] <= j, Gj - Ga, -jnp.inf))
            dq, dk = dq * scale, dk * scale
            t = pl.ds(a * c, c)
            dq_ref[t, :] = (dq + dqp_ref[t, :]).astype(dq_ref.dtype)
            dk_ref[t, :] = (dk + dkp_ref[t, :]).astype(dk_ref.dtype)
            dg_ref[t, :] = qa * dq - ka * dk + dgp_ref[t, :]

    rows = lambda X: common.spec(H, C, X, t=0)
    return pl.pallas_call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp)] * 3 + [rows(C)] + [rows(Kp)] * 3,
        out_specs=[rows(Kp)] * 3,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(q.shape, f32)],
        compiler_params=triton_params(cfg.warps_intra, 1),
        interpret=interpret(), name="gla_intra_backward",
    )(q, k, G, dA, dq_p, dk_p, dG_p)
