"""Fenwick-tree level bookkeeping and the chunk-parallel form of log-linear attention.

The recurrence and its level rule are stated once in `linear_jax.ops.log_linear_simple_gla`; here:

  position  p_t: tokens of t's document before t (the first document continues the initial
            state's position). Levels depend on positions, never on t itself, so a packed document
            computes exactly what it computes alone.
  target    the level that step p merges into: L-1 at p = 0, else min(ctz(p) + 1, L-1).
  level     of key j seen from query i of one document: the largest target over (j, i], which is
            min(bit_length(p_i XOR p_j), L-1) (the highest bit where p_i and p_j differ).
  merge     content at level l moves to max(l, target) at a step, so the content of level l of a
            state held after position p0 - 1 sits, seen from query p, at max(l, M) with
            M = min(bit_length((p0 - 1) XOR p), L-1), or M = L-1 for a fresh document (p0 = 0).

Chunk form: the intra-chunk matrix is Mamba-2's (q k^T) * exp(segsum(g)) times the hierarchical
matrix lambda_i^(level(i, j)); the chunk reads the L level states it enters with, each through the
weight lambda_i^(max(l, M_i)); the state scan maps levels by the merge (an [L, L] 0/1 matrix per
chunk) and adds what the chunk's keys write, one [K, V] per level. Intra work is O(T C); the level
states cost O(T L K V / C) and L = O(log T).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import doc_masks, from_chunks, pad_time, resets, to_chunks
from linear_jax.ops.common.gates import cumsum_incl, rev_cumsum_excl, segsum

_HI = lax.Precision.HIGHEST


class FenwickState(NamedTuple):
    """The state of a log-linear op: `levels [B, H, L, K, V]` float32 (level 0 holds the latest
    token, level l >= 1 the keys of the l-th Fenwick bucket, level L-1 everything older) and
    `position [B]` float32, the tokens of the current document absorbed so far (an integer below
    2^24 held as a float so that the state is a tree of float arrays; a reset zeroes it)."""

    levels: jax.Array
    position: jax.Array


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HI, preferred_element_type=jnp.float32)


def bit_length(x):
    """Number of bits of a non-negative int32 array."""
    return 32 - lax.clz(x.astype(jnp.int32))


def step_targets(pos, L: int):
    """The level each step merges into: L-1 at position 0, else min(ctz(p) + 1, L-1)."""
    ctz = lax.population_count((pos & -pos) - 1)
    return jnp.where(pos == 0, L - 1, jnp.minimum(ctz + 1, L - 1))


def held_level(prev, pos, L: int):
    """M: the least level, seen from position `pos`, of content held after position `prev`
    (prev < 0: a fresh document, everything held sits at the top level)."""
    return jnp.where(prev < 0, L - 1, jnp.minimum(bit_length(jnp.maximum(prev, 0) ^ pos), L - 1))


def positions(p0, segment_ids, B: int, T: int):
    """int32 [B, T] positions within documents; p0 [B] int32 continues the first document."""
    t = jnp.arange(T, dtype=jnp.int32)
    if segment_ids is None:
        return p0[:, None] + t
    r = resets(segment_ids)
    start = lax.cummax(jnp.where(r, t, 0), axis=1)
    first = lax.cummax(r.astype(jnp.int32), axis=1) == 0      # still in the first document
    return t - start + jnp.where(first, p0[:, None], 0)


def merge(levels, M):
    """Levels [B, H, L, K, V] after content at level l moved to max(l, M[B]) (sums kept)."""
    L = levels.shape[2]
    l = jnp.arange(L)
    to = jnp.maximum(l[None, :], M[:, None])                           # [B, L]
    P = (to[:, None, :] == l[None, :, None]).astype(levels.dtype)      # [B, L(to), L(from)]
    return _einsum("bml,bhlkv->bhmkv", P, levels)


def pick(lam, idx):
    """lam [B, H, ..., L] at level idx [B, ..., J] -> [B, H, ..., J] (one-hot: plain gradients)."""
    onehot = (idx[..., None] == jnp.arange(lam.shape[-1])).astype(lam.dtype)
    return _einsum("bh...l,b...jl->bh...j", lam, onehot)


def chunk_fenwick(q, k, v, g, lam, pos, S0, *, scale, segment_ids, chunk_size):
    """Chunk-parallel log-linear attention (module docstring).

    q, k [B,T,H,K]; v [B,T,H,V]; g None | [B,T,H]; lam [B,T,H,L]; pos [B,T] int32 (`positions`);
    S0 [B,H,L,K,V] float32. Returns o [B,T,H,V] float32 and the levels [B,H,L,K,V] after T.
    """
    B, T, H, K = q.shape
    L = lam.shape[-1]
    C = int(chunk_size)
    f32 = lambda x: x.astype(jnp.float32)
    qc, kc, vc = to_chunks(f32(q) * scale, C), to_chunks(f32(k), C), to_chunks(f32(v), C)
    lc = to_chunks(f32(lam), C)                                        # [B,H,N,C,L]
    N = qc.shape[2]
    # padding repeats the last position: seen from there, levels are those seen from T - 1
    P = pad_time(pos, N * C, axis=1, mode="edge").reshape(B, N, C)
    same, in_rows, out_rows, keep = doc_masks(segment_ids, T, C, N)
    gc = jnp.zeros(qc.shape[:4], jnp.float32) if g is None else to_chunks(f32(g), C)

    lev = jnp.minimum(bit_length(P[..., :, None] ^ P[..., None, :]), L - 1)       # [B,N,C,C]
    D = jnp.where(same, segsum(gc), -jnp.inf)
    A = _einsum("bhnik,bhnjk->bhnij", qc, kc) * jnp.exp(D) * pick(lc, lev)

    # the state entering chunk n was last written at position P[n, 0] - 1 (-1: a fresh document)
    M = held_level(P[..., :1] - 1, P, L)                                           # [B,N,C]
    w_in = pick(lc, jnp.maximum(jnp.arange(L), M[..., None]))                      # [B,H,N,C,L]
    q_in = jnp.where(in_rows[..., None], qc * jnp.exp(cumsum_incl(gc, 3))[..., None], 0.0)
    k_out = jnp.where(out_rows[..., None], kc * jnp.exp(rev_cumsum_excl(gc, 3))[..., None], 0.0)
    # what the chunk writes, by the level its keys sit at seen from the chunk's last row
    at_end = (lev[..., -1, :, None] == jnp.arange(L)).astype(jnp.float32)         # [B,N,C,L]
    dS = _einsum("bhnck,bncl,bhncv->bhnlkv", k_out, at_end, vc)
    decay = jnp.where(keep, jnp.exp(gc.sum(3)), 0.0)                                # [B,H,N]

    def step(S, x):
        d, ds, m = x
        return d[..., None, None, None] * merge(S, m) + ds, S

    t = lambda x: jnp.moveaxis(x, 2, 0)
    S_fin, S_in = lax.scan(step, S0, (t(decay), t(dS), jnp.moveaxis(M[..., -1], 1, 0)))
    S_in = jnp.moveaxis(S_in, 0, 2)                                                # [B,H,N,L,K,V]
    o = _einsum("bhnij,bhnjv->bhniv", A, vc)
    o = o + _einsum("bhncl,bhnck,bhnlkv->bhncv", w_in, q_in, S_in)
    return from_chunks(o, T), S_fin
