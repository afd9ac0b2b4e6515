"""Chunk layout and packed-document bookkeeping.

Letters: B batch, T time, H heads, N chunks, C chunk length, K key dim, V value dim.
Public layout is `[B, T, H, ...]`; chunk computations run on `[B, H, N, C, ...]`, T padded up to
N * C with zeros. Zero padding is neutral for every op (k = v = 0, g = 0, beta = 0 change no state)
and padded rows are dropped on the way out.

Packed documents: `segment_ids [B, T]` resets the state before step t where the id changes from
t-1 to t. We turn the ids into a monotone document index `doc_t = #resets in (0, t]`, so "same
document" is a plain equality even when ids repeat (A, B, A), and t = 0 never resets (the
initial state applies there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_chunks(T: int, C: int) -> int:
    return -(-T // C)


def pad_time(x, T_pad: int, axis: int = 1, mode: str = "constant"):
    T = x.shape[axis]
    if T_pad == T:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, T_pad - T)
    return jnp.pad(x, widths, mode=mode)


def pad_to(x, axis: int, size: int):
    """Zeros at the end of `axis`, up to `size`."""
    return pad_time(x, size, axis=axis)


def pad_groups(x, axis: int, groups: int, size: int):
    """`axis` as `groups` equal slices, each zero-padded at its end to `size` (channels grouped
    as B / C of a selective scan: a kernel's channel blocks must not straddle two groups)."""
    s = x.shape
    x = pad_to(x.reshape(s[:axis] + (groups, s[axis] // groups) + s[axis + 1:]), axis + 1, size)
    return x.reshape(s[:axis] + (groups * size,) + s[axis + 1:])


def unpad_groups(x, axis: int, groups: int, size: int):
    """The inverse of `pad_groups`: the first `size` entries of each of the `groups` slices."""
    s = x.shape
    x = x.reshape(s[:axis] + (groups, s[axis] // groups) + s[axis + 1:])
    x = jax.lax.slice_in_dim(x, 0, size, axis=axis + 1)
    return x.reshape(s[:axis] + (groups * size,) + s[axis + 1:])


def to_chunks(x, C: int):
    """[B, T, H, ...] -> [B, H, N, C, ...] (zero-padded in T)."""
    B, T, H = x.shape[:3]
    N = num_chunks(T, C)
    x = pad_time(x, N * C)
    x = x.reshape(B, N, C, H, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def from_chunks(y, T: int):
    """[B, H, N, C, ...] -> [B, T, H, ...] (drops the padding)."""
    B, H, N, C = y.shape[:4]
    y = jnp.moveaxis(y, 1, 3).reshape(B, N * C, H, *y.shape[4:])
    return y[:, :T]


def doc_index(segment_ids):
    """int32 [B, T]: number of resets at or before t (a reset is an id change from t-1 to t)."""
    seg = jnp.asarray(segment_ids)
    change = jnp.concatenate(
        [jnp.zeros_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], axis=1
    )
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def resets(segment_ids):
    """bool [B, T]: True where the state is zeroed before step t."""
    seg = jnp.asarray(segment_ids)
    return jnp.concatenate(
        [jnp.zeros_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], axis=1
    )


def chunk_docs(segment_ids, T: int, C: int):
    """Chunked document index and the document entering each chunk.

    Returns `doc [B, N, C]` (padding repeats the last document, so it never resets) and
    `doc_in [B, N]`, the document of the token just before the chunk (chunk 0: document 0,
    the one the initial state belongs to).
    """
    doc = doc_index(segment_ids)
    N = num_chunks(T, C)
    doc = pad_time(doc, N * C, axis=1, mode="edge").reshape(doc.shape[0], N, C)
    doc_in = jnp.concatenate([jnp.zeros_like(doc[:, :1, 0]), doc[:, :-1, -1]], axis=1)
    return doc, doc_in


def doc_masks(segment_ids, T: int, C: int, N: int):
    """The masks a chunk form needs for packed documents (contiguous documents: each is exact).

    same [B|1, 1, N|1, C, C]: causal pairs in the same document; in_rows [B|1, 1, N|1, C]: rows
    still in the document that entered the chunk (they read S_in); out_rows: rows in the chunk's
    last document (they write S_out); keep [B|1, 1, N]: the chunk holds no reset (S_in survives).
    Without segment ids every mask is all-true and broadcasts.
    """
    i = jnp.arange(C)
    causal = i[:, None] >= i[None, :]
    if segment_ids is None:
        ones = jnp.ones((1, 1, N, C), bool)
        return causal[None, None, None], ones, ones, jnp.ones((1, 1, N), bool)
    doc, doc_in = chunk_docs(segment_ids, T, C)                  # [B,N,C], [B,N]
    same = (causal & (doc[..., :, None] == doc[..., None, :]))[:, None]
    in_rows = (doc == doc_in[..., None])[:, None]
    out_rows = (doc == doc[..., -1:])[:, None]
    keep = (doc[..., -1] == doc_in)[:, None]
    return same, in_rows, out_rows, keep
