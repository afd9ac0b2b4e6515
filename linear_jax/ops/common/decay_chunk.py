"""Chunk-parallel form of the decay family, written once for three gate kinds.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = q_t^T S_t      (q already scaled)

with g absent (linear attention), a scalar per head (simple GLA, RetNet, Mamba-2) or a K-vector
(GLA, HGRN2). Inside chunk n with inclusive chunk-local cumulative gate G_i = sum_{s<=i} g_s:

    o_i   = (q_i * exp(G_i))^T S_in  +  sum_{j<=i} [sum_k q_ik k_jk exp(G_ik - G_jk)] v_j
    S_out = exp(G_last) * S_in       +  sum_j (k_j * exp(G_last - G_j)) v_j^T

Every exponent above is a sum of gates over a span, <= 0, so nothing overflows: a decay can only
underflow to an exact 0. Each span sum is formed from exactly the gates inside the span
(`linear_jax.ops.common.gates`), never as a difference G_i - G_j, so the gradient of g stays exact
when the decay is strong. The scalar gate gives the intra-chunk term (q k^T) * exp(segsum(g)).
The vector gate cannot be factored through one reference point without ratios exp(-G) that
overflow, so the chunk is cut into sub-chunks of length c: a block of queries a and keys b < a
factors through the gate at the end of sub-chunk b (both factors <= 1), and the diagonal blocks are
formed elementwise from a [c, c, K] tensor.

Packed documents enter as masks, never as -inf gates (a -inf inside a cumulative sum would swamp the
finite differences around it): the intra term keeps pairs in the same document, the incoming state
reaches rows still in the entering document, and only the chunk's last document writes S_out.

Chunk states are passed by one `lax.scan` over N carrying [B, H, K, V] in float32; autodiff of that
scan keeps one state per chunk, O(T/C K V). The sub-chunk tensors of the vector gate are rebuilt in
the backward pass (`jax.checkpoint`) so only the [C, C] intra matrix is kept.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import doc_masks, from_chunks, to_chunks
from linear_jax.ops.common.gates import cumsum_incl, rev_cumsum_excl, segsum
from linear_jax.ops.common.recurrent import state_or_zeros

_HI = lax.Precision.HIGHEST
SUB_CHUNK = 16


def _einsum(spec, *xs):
    # complex operands (Mamba-3's rotary channels through `_intra_vector` and `scan_chunks`) keep
    # their complex type: a float32 accumulation type would drop the imaginary part
    complex_ = any(jnp.iscomplexobj(x) for x in xs)
    return jnp.einsum(spec, *xs, precision=_HI,
                      preferred_element_type=None if complex_ else jnp.float32)


def _intra_scalar(q, k, g, mask):
    """q, k [B,H,N,C,K]; g [B,H,N,C]; mask [B|1,1,N|1,C,C] -> A [B,H,N,C,C]."""
    D = jnp.where(mask, segsum(g), -jnp.inf)
    return _einsum("bhnik,bhnjk->bhnij", q, k) * jnp.exp(D)


def _intra_vector(q, k, g, mask, c):
    """Vector gate: g [B,H,N,C,K]; sub-chunks of length c (see the module docstring)."""
    B, H, N, C, K = q.shape
    s = C // c
    qs, ks, gs = (x.reshape(B, H, N, s, c, K) for x in (q, k, g))
    into = cumsum_incl(gs, axis=4)                        # (start of a sub-chunk, i]
    kt = ks * jnp.exp(rev_cumsum_excl(gs, axis=4))        # keys decayed to their sub-chunk's end
    total = gs.sum(axis=4)                                # [B,H,N,s,K]
    # diagonal blocks: elementwise in K
    dd = jnp.moveaxis(segsum(jnp.moveaxis(gs, -1, -2)), -3, -1)       # [B,H,N,s,c,c,K]
    diag = (qs[..., :, None, :] * jnp.exp(dd) * ks[..., None, :, :]).sum(-1)
    zero = jnp.zeros((B, H, N, c, c), jnp.float32)
    rows = []
    for a in range(s):
        row = [zero] * s
        row[a] = diag[:, :, :, a]
        # keys of sub-chunk b < a: the span (j, i] is (j, end of b] + the sub-chunks between +
        # (start of a, i], each a sum of gates with no subtraction
        between = jnp.zeros((B, H, N, K), jnp.float32)
        for b in range(a - 1, -1, -1):
            qt = qs[:, :, :, a] * jnp.exp(into[:, :, :, a] + between[..., None, :])
            row[b] = _einsum("bhnik,bhnjk->bhnij", qt, kt[:, :, :, b])
            between = between + total[:, :, :, b]
        rows.append(jnp.concatenate(row, axis=-1))
    return jnp.where(mask, jnp.concatenate(rows, axis=-2), 0.0)


def _map_chunks(f, *xs, batch: int = 8):
    """f over chunks a few at a time, rebuilt in the backward pass: the [c, c, K] temporaries of
    the vector gate then live for one batch of chunks, not for the whole sequence."""
    N = xs[0].shape[2]
    xs = [jnp.moveaxis(jnp.broadcast_to(x, x.shape[:2] + (N,) + x.shape[3:]), 2, 0) for x in xs]
    body = jax.checkpoint(lambda x: f(*(a[:, :, None] for a in x))[:, :, 0])
    return jnp.moveaxis(lax.map(body, xs, batch_size=min(batch, N)), 0, 2)


class ChunkPieces(NamedTuple):
    """Everything of the chunk form that needs no state (the stage before the state scan).

    A [B,H,N,C,C] intra-chunk matrix; v [B,H,N,C,V] chunked values; q_in [B,H,N,C,K] queries
    decayed to the chunk start (zero on rows past a reset); dS [B,H,N,K,V] what the chunk writes
    into the state from zero; log_decay [B|1,H|1,N,K|1,1] the chunk's total log decay (0 without a
    gate); keep [B|1,1,N,1,1] the chunk holds no reset, so the entering state survives it.
    """

    A: jax.Array
    v: jax.Array
    q_in: jax.Array
    dS: jax.Array
    log_decay: jax.Array
    keep: jax.Array


def chunk_pieces(q, k, v, g, *, scale, segment_ids, chunk_size) -> ChunkPieces:
    """The state-free stage of the chunk form (shared with the sequence-parallel ZeCO staging).

    q, k [B,T,H,K]; v [B,T,H,V]; g None | [B,T,H] | [B,T,H,K]. Inputs are promoted to float32.
    """
    T = q.shape[1]
    C = int(chunk_size)
    f32 = lambda x: x.astype(jnp.float32)
    qc, kc, vc = to_chunks(f32(q) * scale, C), to_chunks(f32(k), C), to_chunks(f32(v), C)
    N = qc.shape[2]
    same, in_rows, out_rows, keep = doc_masks(segment_ids, T, C, N)
    if g is None:
        A = jnp.where(same, _einsum("bhnik,bhnjk->bhnij", qc, kc), 0.0)
        q_in, k_out = qc, kc
        log_decay = jnp.zeros((1, 1, N, 1, 1), jnp.float32)
    else:
        gc = to_chunks(f32(g), C)
        vector = g.ndim == 4
        if vector:
            c = math.gcd(C, SUB_CHUNK)
            A = _map_chunks(lambda *x: _intra_vector(*x, c), qc, kc, gc, same)
        else:
            A = _intra_scalar(qc, kc, gc, same)
        e_in, e_out = jnp.exp(cumsum_incl(gc, 3)), jnp.exp(rev_cumsum_excl(gc, 3))
        q_in = qc * (e_in if vector else e_in[..., None])
        k_out = kc * (e_out if vector else e_out[..., None])
        log_decay = gc.sum(3)[..., None] if vector else gc.sum(3)[..., None, None]
    q_in = jnp.where(in_rows[..., None], q_in, 0.0)
    k_out = jnp.where(out_rows[..., None], k_out, 0.0)
    dS = _einsum("bhnck,bhncv->bhnkv", k_out, vc)
    return ChunkPieces(A, vc, q_in, dS, log_decay, keep[..., None, None])


def scan_chunks(S0, decay, dS=None, *, W=None, U=None, k_out=None):
    """The chunk state scan, written once for the decay family and the delta rule (the kernels'
    `chunk_state` pass is the same recurrence): over chunks n = 0 .. N-1,

        S_{n+1} = decay_n S_n + dS_n                       (decay family: dS_n = k_out_n^T v_n)
        u_n = U_n - W_n S_n,  S_{n+1} = decay_n S_n + k_out_n^T u_n [+ dS_n]   (delta rule, RWKV-7)

    S0 [B,H,K,V] float32; decay [B|1,H|1,N|1,K|1,1]; dS [B,H,N,K,V] (optional with W); W, k_out
    [B,H,N,C,K], U [B,H,N,C,V]. Returns (final state, entering state of every chunk [B,H,N,K,V],
    u [B,H,N,C,V] or None)."""
    B, H = S0.shape[:2]
    N = (dS if W is None else W).shape[2]
    decay = jnp.broadcast_to(decay, (B, H, N) + decay.shape[3:])
    t = lambda x: jnp.moveaxis(x, 2, 0)                       # chunks first
    back = lambda x: jnp.moveaxis(x, 0, 2)

    def step(S, inp):
        if W is None:
            d, ds = inp
            return d * S + ds, (S, None)
        d, W_n, U_n, k_n, *ds = inp
        u = U_n - _einsum("bhck,bhkv->bhcv", W_n, S)
        return d * S + _einsum("bhck,bhcv->bhkv", k_n, u) + sum(ds), (S, u)

    xs = (t(decay), t(dS)) if W is None else (t(decay), t(W), t(U), t(k_out)) + (
        () if dS is None else (t(dS),))
    S_final, (S_in, u) = lax.scan(step, S0, xs)
    return S_final, back(S_in), None if u is None else back(u)


def pass_states(pieces: ChunkPieces, S0):
    """The decay family's chunk state scan: (final state, entering state of every chunk
    [B,H,N,K,V])."""
    decay = jnp.where(pieces.keep, jnp.exp(pieces.log_decay), 0.0)
    S_final, S_in, _ = scan_chunks(S0, decay, pieces.dS)
    return S_final, S_in


def chunk_decay(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    """Chunk-parallel decay recurrence.

    q, k [B,T,H,K]; v [B,T,H,V]; g None | [B,T,H] | [B,T,H,K] log decays; initial_state [B,H,K,V]
    or None. Inputs are promoted to float32. Returns o [B,T,H,V] float32 and S [B,H,K,V] float32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    p = chunk_pieces(q, k, v, g, scale=scale, segment_ids=segment_ids, chunk_size=chunk_size)
    S0 = state_or_zeros(initial_state, (B, H, K, V))
    S_final, S_in = pass_states(p, S0)
    o = _einsum("bhnij,bhnjv->bhniv", p.A, p.v) + _einsum("bhnik,bhnkv->bhniv", p.q_in, S_in)
    return from_chunks(o, T), S_final
