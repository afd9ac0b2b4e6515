"""Sequence-parallel causal softmax attention for hybrid models (LASP-2H style), on the same
`seq` axis and layout as the linear layers.

Each device all-gathers K and V along the sequence (one collective each; with GQA they are small)
and attends with its local queries against the gathered keys under the causal mask of the global
positions. Autodiff transposes the gathers into reduce-scatters of dK and dV. Memory is the full
K, V plus a [T_loc, T] score block per head.

Layouts. "contiguous": device p holds tokens [p T_loc, (p+1) T_loc); under a causal mask device p
does (2p + 1) half-blocks of work, 3:1 between the two devices at P = 2. "zigzag": the sequence is
cut into 2P chunks and device i holds chunks i and 2P-1-i, which balances the causal work.
`attention(..., mesh=, layout="zigzag")` takes and returns arrays in sequence order and permutes
them into zigzag order and back itself (`permute=False` for arrays already in zigzag order);
`to_zigzag` / `from_zigzag` are those permutations of the time axis (under a sequence sharding
XLA turns each into an all-to-all). The linear ops of this package assume the contiguous layout.

Public as `linear_jax.parallel.attention` (and `to_zigzag`, `from_zigzag`); this module is
`linear_jax.parallel.softmax`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linear_jax.ops.common.chunking import doc_index
from linear_jax.parallel.mesh import run_on_mesh

LAYOUTS = ("contiguous", "zigzag")


def positions(T: int, P: int, layout: str) -> np.ndarray:
    """int [P, T // P]: the global position of every token each device holds."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "contiguous":
        return np.arange(T).reshape(P, T // P)
    if T % (2 * P):
        raise ValueError(f"the zigzag layout needs T={T} to be a multiple of 2P={2 * P}")
    c = T // (2 * P)
    chunks = np.arange(T).reshape(2 * P, c)
    return np.stack([np.concatenate([chunks[i], chunks[2 * P - 1 - i]]) for i in range(P)])


def to_zigzag(x, P: int, axis: int = 1):
    """Global sequence order -> zigzag order (device i's chunks i and 2P-1-i next to each other)."""
    return jnp.take(x, positions(x.shape[axis], P, "zigzag").reshape(-1), axis=axis)


def from_zigzag(x, P: int, axis: int = 1):
    """Zigzag order -> global sequence order."""
    inv = np.argsort(positions(x.shape[axis], P, "zigzag").reshape(-1))
    return jnp.take(x, inv, axis=axis)


def attention_local(q, k, v, *, axis_name="seq", layout="contiguous", scale=None,
                    segment_ids=None, window=None, block_size=None):
    """Causal attention of the local queries against the whole sequence; call inside
    `shard_map`. q [B,T_loc,H,D]; k, v [B,T_loc,Hkv,D] (H a multiple of Hkv); segment_ids
    [B,T_loc] or None (packed documents: a query sees keys of its own document only); `window`:
    a query sees the `window` latest positions (itself included); `block_size`: only keys of its
    own block of `block_size` positions, counted from its document's start (TNL's
    DiagAttention). Returns o [B,T_loc,H,D] in q's dtype."""
    k_all = lax.all_gather(k, axis_name, axis=1, tiled=True)
    v_all = lax.all_gather(v, axis_name, axis=1, tiled=True)
    mask = global_mask(q.shape[1], axis_name=axis_name, layout=layout, segment_ids=segment_ids,
                       window=window, block_size=block_size)
    return jax.nn.dot_product_attention(q, k_all, v_all, mask=mask, scale=scale)


def global_mask(T_loc, *, axis_name, layout, segment_ids=None, window=None, block_size=None):
    """bool [B or 1, 1, T_loc, T]: which of the gathered keys (in the gathered, `layout` order)
    each local query sees; call inside `shard_map` (arguments as `attention_local`)."""
    P = lax.axis_size(axis_name)
    pos = jnp.asarray(positions(P * T_loc, P, layout))           # static table
    pos_q = pos[lax.axis_index(axis_name)]
    pos_k = pos.reshape(-1)
    mask = (pos_q[:, None] >= pos_k[None, :])[None, None]         # [1,1,T_loc,T]
    if window is not None:
        mask = mask & (pos_q[:, None] - pos_k[None, :] < window)[None, None]
    start_q = start_k = 0
    if segment_ids is not None:
        seg = lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
        seg = seg[:, jnp.argsort(pos_k)]                           # global order
        doc = doc_index(seg)
        same = doc[:, pos_q][:, :, None] == doc[:, pos_k][:, None, :]
        mask = mask & same[:, None]
        if block_size is not None:     # each position's document start, in global order
            t = jnp.arange(P * T_loc, dtype=jnp.int32)
            fresh = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]],
                                    axis=1)
            start = lax.cummax(jnp.where(fresh, t, 0), axis=1)
            start_q, start_k = start[:, pos_q][:, :, None], start[:, pos_k][:, None, :]
    if block_size is not None:   # within one document (masked above), start_q == start_k
        blk_q = (pos_q[None, :, None] - start_q) // block_size
        blk_k = (pos_k[None, None, :] - start_k) // block_size
        mask = mask & (blk_q == blk_k)[:, None]
    return mask


def attention(q, k, v, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
              layout="contiguous", permute=True, scale=None, segment_ids=None, window=None,
              block_size=None):
    """Sequence-parallel causal softmax attention (GQA, packed documents, sliding window,
    in-document blocks). q [B,T,H,D]; k, v [B,T,Hkv,D]; segment_ids [B,T] or None.

    With `mesh=` it builds the `shard_map` (arrays split `P(batch, axis_name, heads)`) and takes
    and returns arrays in sequence order: with `layout="zigzag"` it permutes them into zigzag
    order and the output back (`permute=False`: q, k, v and segment_ids are already in zigzag
    order, and the output stays in it). With `mesh=None` call it inside your `shard_map` on the
    local shards, laid out in `layout` order (see `attention_local`). Returns o [B,T,H,D]."""
    kw = dict(layout=layout, scale=scale, window=window, block_size=block_size)
    if mesh is None:
        return attention_local(q, k, v, axis_name=axis_name, segment_ids=segment_ids, **kw)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    P = mesh.shape[axis_name]
    zig = layout == "zigzag" and permute
    z = (lambda a: None if a is None else to_zigzag(a, P)) if zig else (lambda a: a)
    local = lambda q, k, v, initial_state, **a: attention_local(q, k, v, **kw, **a)
    o = run_on_mesh(local, mesh, (z(q), z(k), z(v)), segment_ids=z(segment_ids),
                    seq_axis=axis_name, batch_axes=batch_axes, head_axes=head_axes,
                    with_state=False)
    return from_zigzag(o, P) if zig else o
