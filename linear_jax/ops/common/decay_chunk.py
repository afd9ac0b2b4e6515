"""Chunk-parallel form of the decay family, written once for three gate kinds.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = q_t^T S_t      (q already scaled)

with g absent (linear attention), a scalar per head (simple GLA, RetNet, Mamba-2) or a K-vector
(GLA, HGRN2). Inside chunk n with inclusive chunk-local cumulative gate G_i = sum_{s<=i} g_s:

    o_i   = (q_i * exp(G_i))^T S_in  +  sum_{j<=i} [sum_k q_ik k_jk exp(G_ik - G_jk)] v_j
    S_out = exp(G_last) * S_in       +  sum_j (k_j * exp(G_last - G_j)) v_j^T

Every exponent above is <= 0 because G decreases along the chunk, so nothing overflows: a decay can
only underflow to an exact 0. The scalar gate factors the intra-chunk term as (q k^T) * exp(G_i - G_j)
masked before the exp. The vector gate cannot be factored through one reference point without ratios
exp(-G) that overflow, so the chunk is cut into sub-chunks of length c: a block of queries a and keys
b < a factors through the gate at the end of sub-chunk b (both factors <= 1), and the diagonal blocks
are formed elementwise from a [c, c, K] tensor.

Packed documents enter as masks, never as -inf gates (a -inf inside a cumulative sum would swamp the
finite differences around it): the intra term keeps pairs in the same document, the incoming state
reaches rows still in the entering document, and only the chunk's last document writes S_out.

Chunk states are passed by one `lax.scan` over N carrying [B, H, K, V] in float32; autodiff of that
scan keeps one state per chunk, O(T/C K V). The sub-chunk tensors of the vector gate are rebuilt in
the backward pass (`jax.checkpoint`) so only the [C, C] intra matrix is kept.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import chunk_docs, from_chunks, to_chunks

_HI = lax.Precision.HIGHEST
SUB_CHUNK = 16


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HI, preferred_element_type=jnp.float32)


def _causal(C):
    i = jnp.arange(C)
    return i[:, None] >= i[None, :]


def _intra_scalar(q, k, G, mask):
    """q, k [B,H,N,C,K]; G [B,H,N,C]; mask [B,H|1,N,C,C] -> A [B,H,N,C,C]."""
    diff = jnp.where(mask, G[..., :, None] - G[..., None, :], -jnp.inf)
    return _einsum("bhnik,bhnjk->bhnij", q, k) * jnp.exp(diff)


def _intra_vector(q, k, G, mask, c):
    """Vector gate: G [B,H,N,C,K]; sub-chunks of length c (see the module docstring)."""
    B, H, N, C, K = q.shape
    s = C // c
    qs, ks, Gs = (x.reshape(B, H, N, s, c, K) for x in (q, k, G))
    ref = Gs[..., -1, :]                                   # [B,H,N,s,K]: gate ending sub-chunk b
    later = (jnp.arange(s)[:, None] > jnp.arange(s)[None, :])[:, None, :, None]  # a > b
    # query sub-chunk a against key sub-chunk b < a, both factors through ref_b are <= 1
    dq = jnp.where(later, Gs[..., :, :, None, :] - ref[..., None, None, :, :], -jnp.inf)
    qt = qs[..., :, :, None, :] * jnp.exp(dq)              # [B,H,N,a,c,b,K]
    kt = ks * jnp.exp(ref[..., None, :] - Gs)              # [B,H,N,b,c,K]
    A = _einsum("zhnaiyk,zhnyjk->zhnaiyj", qt, kt)         # [B,H,N,a,c,b,c]
    tri = _causal(c)[..., None]
    dd = jnp.where(tri, Gs[..., :, None, :] - Gs[..., None, :, :], -jnp.inf)
    diag = (qs[..., :, None, :] * jnp.exp(dd) * ks[..., None, :, :]).sum(-1)  # [B,H,N,s,c,c]
    eye = jnp.eye(s, dtype=bool)[:, None, :, None]
    A = A + jnp.where(eye, diag[..., :, :, None, :], 0.0)
    return jnp.where(mask, A.reshape(B, H, N, C, C), 0.0)


def chunk_decay(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    """Chunk-parallel decay recurrence.

    q, k [B,T,H,K]; v [B,T,H,V]; g None | [B,T,H] | [B,T,H,K] log decays; initial_state [B,H,K,V]
    or None. Inputs are promoted to float32. Returns o [B,T,H,V] float32 and S [B,H,K,V] float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    f32 = lambda x: x.astype(jnp.float32)
    qc, kc, vc = to_chunks(f32(q) * scale, C), to_chunks(f32(k), C), to_chunks(f32(v), C)
    N = qc.shape[2]
    kind = "none" if g is None else ("scalar" if g.ndim == 3 else "vector")
    G = None if g is None else jnp.cumsum(to_chunks(f32(g), C), axis=3)

    causal = _causal(C)
    if segment_ids is None:
        same = causal[None, None, None]                        # [1,1,1,C,C]
        in_rows = jnp.ones((1, 1, N, C), bool)
        out_rows = jnp.ones((1, 1, N, C), bool)
        keep = jnp.ones((1, 1, N), bool)
    else:
        doc, doc_in = chunk_docs(segment_ids, T, C)            # [B,N,C], [B,N]
        same = (causal & (doc[..., :, None] == doc[..., None, :]))[:, None]
        in_rows = (doc == doc_in[..., None])[:, None]
        out_rows = (doc == doc[..., -1:])[:, None]
        keep = (doc[..., -1] == doc_in)[:, None]

    if kind == "none":
        A = jnp.where(same, _einsum("bhnik,bhnjk->bhnij", qc, kc), 0.0)
        q_in, k_out, decay = qc, kc, None
    elif kind == "scalar":
        A = _intra_scalar(qc, kc, G, same)
        last = G[..., -1:]
        q_in = qc * jnp.exp(G)[..., None]
        k_out = kc * jnp.exp(last - G)[..., None]
        decay = jnp.exp(last[..., 0])[..., None, None]         # [B,H,N,1,1]
    else:
        c = math.gcd(C, SUB_CHUNK)
        A = jax.checkpoint(_intra_vector, static_argnums=(4,))(qc, kc, G, same, c)
        last = G[..., -1:, :]
        q_in = qc * jnp.exp(G)
        k_out = kc * jnp.exp(last - G)
        decay = jnp.exp(last[..., 0, :])[..., None]            # [B,H,N,K,1]

    q_in = jnp.where(in_rows[..., None], q_in, 0.0)
    k_out = jnp.where(out_rows[..., None], k_out, 0.0)
    dS = _einsum("bhnck,bhncv->bhnkv", k_out, vc)
    keep = keep[..., None, None]
    if decay is None:
        decay = jnp.ones((1, 1, N, 1, 1), jnp.float32)
    decay = jnp.where(keep, decay, 0.0)
    decay = jnp.broadcast_to(decay, (B, H, N) + decay.shape[3:])

    S0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else f32(initial_state)

    def step(S, inp):
        d, ds = inp
        return d * S + ds, S

    S_final, S_in = lax.scan(step, S0, (jnp.moveaxis(decay, 2, 0), jnp.moveaxis(dS, 2, 0)))
    S_in = jnp.moveaxis(S_in, 0, 2)                            # [B,H,N,K,V] entering states
    o = _einsum("bhnij,bhnjv->bhniv", A, vc) + _einsum("bhnik,bhnkv->bhniv", q_in, S_in)
    return from_chunks(o, T), S_final
