"""Wrapper-side layout shared by the TPU kernels, and the in-kernel reads of per-token tables.

Kernels see head-major blocks `[C, D]` of `[B, H, T_pad, D_pad]` arrays: T padded to a multiple of
the chunk C (zero rows change no state), K and V padded to the lane width (zero columns add
nothing). Per-token scalars (a scalar gate, beta, and for packed documents the document index
relative to the document entering the chunk, `linear_jax.ops.common.chunking.chunk_docs`) come as
[N, C] tables; the kernel reads its chunk's row [1, C] and forms the column [C, 1] from it with a
masked lane sum, so a [C, C] mask is one compare of two broadcasts and nothing needs a transpose.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.tpu.mosaic import F32
from linear_jax.ops.common.chunking import chunk_docs, pad_time


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def heads_major(x, T_pad: int, D_pad: int):
    """[B, T, H, D] -> [B, H, T_pad, D_pad], zero-padded."""
    x = pad_time(x, T_pad)
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, D_pad - x.shape[-1])])
    return jnp.swapaxes(x, 1, 2)


def from_heads_major(x, T: int, D: int):
    """[B, H, T_pad, D_pad] -> [B, T, H, D]."""
    return jnp.swapaxes(x[:, :, :T, :D], 1, 2)


def pad_state(S, B, H, K_pad, V_pad):
    if S is None:
        return jnp.zeros((B, H, K_pad, V_pad), F32)
    K, V = S.shape[-2:]
    return jnp.pad(S.astype(F32), [(0, 0), (0, 0), (0, K_pad - K), (0, V_pad - V)])


def doc_table(segment_ids, T: int, C: int):
    """Document index relative to the one entering the chunk, float32 [B, N, C] (small integers,
    exact in float32; compared in the kernel, never summed)."""
    doc, doc_in = chunk_docs(segment_ids, T, C)            # [B, N, C], [B, N]
    return (doc - doc_in[..., None]).astype(F32)


# ---- in-kernel helpers -------------------------------------------------------------------------

def chunk_index(reverse: bool):
    """The chunk this grid step works on (the backward sweeps the chunks in reverse)."""
    n = pl.program_id(2)
    return pl.num_programs(2) - 1 - n if reverse else n


def table_row(ref, idx, row, col):
    """Row idx of a resident [N, C] table as (column [C, 1], row [1, C]), float32."""
    r = ref[pl.ds(idx, 1), :].astype(F32)
    return jnp.sum(jnp.where(row == col, r, 0.0), axis=1, keepdims=True), r


def store_row(ref, idx, column, row, col):
    """Writes a column [C, 1] as row idx of a resident [N, C] table."""
    ref[pl.ds(idx, 1), :] = jnp.sum(jnp.where(row == col, column, 0.0), axis=0, keepdims=True)


def doc_masks_at(ref, idx, row, col):
    """`tiles.doc_masks` of chunk idx from the document table ref (None: a single document)."""
    if ref is None:
        return tiles.doc_masks(None, None, row, col)
    return tiles.doc_masks(*table_row(ref, idx, row, col), row, col)
