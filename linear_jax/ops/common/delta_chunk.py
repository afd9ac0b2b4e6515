"""Chunk-parallel form of the delta-rule family, written once for DeltaNet, Gated DeltaNet, KDA and
DeltaProduct (the latter as a delta rule over its interleaved Householder steps).

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

(q already scaled; g absent means g = 0). KDA's per-channel g_t [K] decays first:
S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T (for a scalar gate the two
orders agree), and every Gamma below is then per channel inside the key sums, formed by the decay
family's sub-chunked vector-gate form. Through the value a step writes,
u_t = beta_t (v_t - k_t^T exp(g_t) S_{t-1}), the step reads S_t = exp(g_t) S_{t-1} + k_t u_t^T.
Inside a chunk entered with state S_in, with inclusive chunk-local cumulative gate G_i and
Gamma_ij = exp(G_i - G_j) for i >= j, unrolling gives for every row i

    u_i = beta_i (v_i - exp(G_i) k_i^T S_in - sum_{j<i} Gamma_ij (k_i . k_j) u_j),

a unit lower-triangular system (I + L) u = diag(beta) (V - (K * exp(G)) S_in) with
L = strictly_lower(diag(beta) (K K^T * Gamma)). Its solution is the WY/UT representation (Yang et
al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; Yang et al.
2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"):

    T = (I + L)^{-1} diag(beta),    W = T (K * exp(G)),    U = T V,    u = U - W S_in
    o_i   = (q_i * exp(G_i))^T S_in + sum_{j<=i} Gamma_ij (q_i . k_j) u_j
    S_out = exp(G_last) S_in        + sum_j (k_j * exp(G_last - G_j)) u_j^T

W and U come from one triangular solve per chunk. Every exponent is a span sum of gates, <= 0,
masked to -inf before the exp where a pair does not couple, and formed from exactly the gates inside
its span (`linear_jax.ops.common.gates`): nothing overflows and there is no ratio exp(-G).

Packed documents enter as masks (documents are contiguous, so every mask below is exact): L and
the intra term couple only pairs in the same document, so T is block diagonal by document; rows
past the chunk's first reset neither read S_in (their row of K * exp(G) is zeroed, hence their row
of W) nor output through it; only the chunk's last document writes S_out; a chunk holding a reset
drops S_in from S_out.

u depends on S_in, so chunk states are passed by a `lax.scan` over N that also emits u; autodiff of
that scan keeps one [K, V] state per chunk, and the intra-chunk pieces are [C, C] per chunk, so
autodiff keeps O(T (C + K + V)) per head and never per-step states or a [T, T] matrix. The intra
pieces are not wrapped in `jax.checkpoint`: rebuilding them for all chunks at once in the backward
pass measured a higher peak (XLA CPU, T = 8192, C = K = V = 64: 50 MiB against 44 MiB; per-step
states would be 128 MiB), and rebuilding them a few chunks at a time saved only a tenth.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import doc_masks, from_chunks, to_chunks
from linear_jax.ops.common.decay_chunk import SUB_CHUNK, _intra_vector, _map_chunks, scan_chunks
from linear_jax.ops.common.gates import cumsum_incl, rev_cumsum_excl, segsum
from linear_jax.ops.common.recurrent import state_or_zeros
from linear_jax.ops.common.triangular import unit_lower_solve

_HI = lax.Precision.HIGHEST


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HI, preferred_element_type=jnp.float32)


def _intra(q, k, v, beta, g, same, in_rows, out_rows):
    """Everything that needs no state: the UT transform and the gated intra-chunk matrix.

    q, k [B,H,N,C,K]; v [B,H,N,C,V]; beta [B,H,N,C]; g None | [B,H,N,C] | [B,H,N,C,K] (a
    per-channel gate, KDA); masks as `chunking.doc_masks`.
    Returns A [B,H,N,C,C], W [..., C, K], U [..., C, V], q_in, k_out [..., C, K] and the chunk
    decay [B|1,H|1,N|1,K|1,1].
    """
    C = q.shape[3]
    qk = lambda a, b: _einsum("bhnik,bhnjk->bhnij", a, b)
    if g is None:
        gamma = same.astype(jnp.float32)
        kk, A = qk(k, k) * gamma, qk(q, k) * gamma
        q_in, k_in, k_out = q, k, k
        decay = jnp.ones((1, 1, 1, 1, 1), jnp.float32)
    elif g.ndim == q.ndim:
        # per-channel gate: the pair decays exp(G_ik - G_jk) do not factor out of the key sum, so
        # both [C, C] matrices come from the decay family's sub-chunked vector-gate form
        # (one map over chunks for both, stacked on the batch axis: two maps side by side trip
        # an XLA CPU verifier error under jit in jaxlib 0.10)
        c = math.gcd(C, SUB_CHUNK)
        two = lambda x: jnp.concatenate([x, x], 0)
        kkA = _map_chunks(lambda *x: _intra_vector(*x, c), jnp.concatenate([k, q], 0), two(k),
                          two(g), two(same) if same.shape[0] > 1 else same)
        kk, A = jnp.split(kkA, 2, axis=0)
        e_in = jnp.exp(cumsum_incl(g, 3))
        q_in, k_in = q * e_in, k * e_in
        k_out = k * jnp.exp(rev_cumsum_excl(g, 3))
        decay = jnp.exp(g.sum(3))[..., None]
    else:
        gamma = jnp.exp(jnp.where(same, segsum(g), -jnp.inf))
        kk, A = qk(k, k) * gamma, qk(q, k) * gamma
        e_in = jnp.exp(cumsum_incl(g, 3))[..., None]
        q_in, k_in = q * e_in, k * e_in
        k_out = k * jnp.exp(rev_cumsum_excl(g, 3))[..., None]
        decay = jnp.exp(g.sum(3))[..., None, None]
    # strictly lower: the unit diagonal is implied, so no gradient reaches k_i . k_i
    strict = ~jnp.eye(C, dtype=bool)
    L = jnp.where(strict, beta[..., :, None] * kk, 0.0)
    rhs = beta[..., None] * jnp.concatenate([v, jnp.where(in_rows[..., None], k_in, 0.0)], -1)
    X = unit_lower_solve(L, rhs)
    U, W = X[..., : v.shape[-1]], X[..., v.shape[-1]:]
    q_in = jnp.where(in_rows[..., None], q_in, 0.0)
    k_out = jnp.where(out_rows[..., None], k_out, 0.0)
    return A, W, U, q_in, k_out, decay


def _chunk_scan(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size):
    """The intra pieces and the state scan: (A, u, q_in, S_in, S_final), chunked."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    f32 = lambda x: x.astype(jnp.float32)
    qc, kc, vc = to_chunks(f32(q) * scale, C), to_chunks(f32(k), C), to_chunks(f32(v), C)
    bc = to_chunks(f32(beta), C)
    gc = None if g is None else to_chunks(f32(g), C)
    N = qc.shape[2]
    same, in_rows, out_rows, keep = doc_masks(segment_ids, T, C, N)

    A, W, U, q_in, k_out, decay = _intra(qc, kc, vc, bc, gc, same, in_rows, out_rows)
    decay = jnp.where(keep[..., None, None], decay, 0.0)
    S0 = state_or_zeros(initial_state, (B, H, K, V))
    S_final, S_in, u = scan_chunks(S0, decay, W=W, U=U, k_out=k_out)
    return A, u, q_in, S_in, S_final


def chunk_delta(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size):
    """Chunk-parallel delta rule.

    q, k [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; g None | [B,T,H] | [B,T,H,K] log decays;
    initial_state [B,H,K,V] or None. Inputs are promoted to float32. Returns o [B,T,H,V] float32 and
    S [B,H,K,V] float32.
    """
    A, u, q_in, S_in, S_final = _chunk_scan(q, k, v, beta, g, scale=scale,
                                            initial_state=initial_state,
                                            segment_ids=segment_ids, chunk_size=chunk_size)
    o = _einsum("bhnij,bhnjv->bhniv", A, u) + _einsum("bhnik,bhnkv->bhniv", q_in, S_in)
    return from_chunks(o, q.shape[1]), S_final


def chunk_delta_values(k, v, beta, g, *, initial_state, segment_ids, chunk_size):
    """The values u_t [B,T,H,V] float32 the delta rule writes (module docstring): the delta rule
    is the decay recurrence S_t = exp(g_t) S_{t-1} + k_t u_t^T over them (log-linear Gated
    DeltaNet reads them through its level states). The unused intra matrix is dead code to XLA."""
    _, u, _, _, _ = _chunk_scan(k, k, v, beta, g, scale=1.0, initial_state=initial_state,
                                segment_ids=segment_ids, chunk_size=chunk_size)
    return from_chunks(u, k.shape[1])
