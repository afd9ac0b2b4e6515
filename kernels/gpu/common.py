"""Shared pieces of the GPU decay-family kernels: tile choice, block specs, packed-document masks.

Every kernel reads the public layout `[B, T, H, X]` in place (no transposes): a block spec squeezes
B and H, keeps T whole or one chunk, and tiles X. Padded shapes: T to a multiple of the chunk C,
K to a power of two (one tile, for q k^T), V to a multiple of the value block BV. Gates enter as
`G`, the chunk-local inclusive cumulative sum of g in float32 (formed in XLA, whose autodiff turns
dG back into dg), `[B, T, H]` (scalar gate) or `[B, T, H, K]` (vector gate).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TritonChunkConfig, _pow2, next_pow2  # noqa: F401
from linear_jax.kernels.gpu.triton import dot
from linear_jax.ops.common.chunking import pad_time


def padded_inputs(q, k, v, C: int):
    """(Tp, Kp, Vp, pad) of an op's entry: T to a multiple of C, K to a power of two (one tile for
    q k^T), V to a multiple of 16; `pad(x, X)` casts a [B, T, H, *] input to the kernels' dtype
    (bf16 / fp16 as given, anything else float32) and zero-pads it to [B, Tp, H, X]."""
    T, K, V = q.shape[1], q.shape[-1], v.shape[-1]
    Tp, Kp, Vp = -(-T // C) * C, next_pow2(K), -(-V // 16) * 16
    dt = jnp.result_type(q, k, v)
    dt = dt if dt in (jnp.bfloat16, jnp.float16) else jnp.float32
    pad = lambda x, X: jnp.pad(pad_time(x.astype(dt), Tp), ((0, 0),) * 3 + ((0, X - x.shape[-1]),))
    return Tp, Kp, Vp, pad


def half_dtype(dtype):
    """Where a kernel stores an intermediate that its partner reads back in float32: float32 for
    float32 inputs, else bfloat16 (float16's range would not hold dW = -du S^T, say)."""
    return jnp.float32 if dtype == jnp.float32 else jnp.bfloat16


def value_block(Vp: int, want: int) -> int:
    """Largest power-of-two tile <= want dividing Vp (a multiple of 16)."""
    b = want
    while Vp % b:
        b //= 2
    return b


def state_tiles(BH: int, Kp: int, Vp: int, cfg: TritonChunkConfig, split_k: bool = True,
                min_bv: int = 16):
    """(BK, BV) of a sequential state pass over a grid (BH, Kp/BK, Vp/BV): the configured tiles,
    the larger one halved (BK >= 32, BV >= min_bv) while the grid has fewer than
    cfg.min_programs. (The delta rule's passes keep all of K and re-read W per value tile, hence
    their larger min_bv.)"""
    BK = min(cfg.block_k, Kp) if split_k else Kp
    BV = value_block(Vp, cfg.block_v)
    while BH * (Kp // BK) * (Vp // BV) < cfg.min_programs:
        can_k, can_v = split_k and BK > 32, BV > min_bv
        if can_k and (BK > BV or not can_v):
            BK //= 2
        elif can_v:
            BV //= 2
        else:
            break
    return BK, BV


# Block specs on the public layout. Grids put B*H first (bh // H, bh % H pick batch and head);
# `t` / `x` name the grid axes (counted after bh) that pick the time block and the last-dim tile.
def spec(H, tb, xb=None, t=None, x=None):
    """[B, T, H(, X)]: blocks of tb rows of T (all of T when t is None) and xb of X."""
    pick = lambda g, a: 0 if a is None else g[a]
    if xb is None:
        return pl.BlockSpec((None, tb, None), lambda bh, *g: (bh // H, pick(g, t), bh % H))
    return pl.BlockSpec((None, tb, None, xb),
                        lambda bh, *g: (bh // H, pick(g, t), bh % H, pick(g, x)))


def doc_spec(H, Tp):
    return pl.BlockSpec((None, Tp), lambda bh, *g: (bh // H, 0))


def state_spec(H, kb, vb, k=None, v=None):
    """[B, H, K, V] states, tiles kb x vb picked by grid axes k, v."""
    pick = lambda g, a: 0 if a is None else g[a]
    return pl.BlockSpec((None, None, kb, vb),
                        lambda bh, *g: (bh // H, bh % H, pick(g, k), pick(g, v)))


def states_spec(H, N, kb, vb, n=None, k=None, v=None):
    """[B, H, N, K, V] per-chunk states: all N (n None) or chunk g[n]; tiles kb x vb."""
    pick = lambda g, a: 0 if a is None else g[a]
    shape = (None, None, N if n is None else None, kb, vb)
    return pl.BlockSpec(shape, lambda bh, *g: (bh // H, bh % H, pick(g, n), pick(g, k), pick(g, v)))


def chunk_masks(doc_ref, n, C, with_pairs: bool):
    """Packed-document masks of chunk n from the document index (see chunking.chunk_docs).

    Returns (in_rows [C] rows still in the entering document, out_rows [C] rows in the chunk's last
    document, keep: scalar, the state crosses the chunk, same [C, C] causal same-document pairs).
    """
    d = doc_ref[pl.ds(n * C, C)]
    d_last = doc_ref[n * C + C - 1]
    d_in = doc_ref[jnp.maximum(n * C - 1, 0)]
    same = None
    if with_pairs:
        same = d[:, None] == d[None, :]
    return d == d_in, d == d_last, d_last == d_in, same


def intra_scalar(q, k, G, mask, scale, exact):
    """A = scale q k^T * exp(G_i - G_j) on the causal same-document pairs (G [C, 1] or None: no
    gate), 0 elsewhere."""
    A = dot(q, k, tb=True, exact=exact) * scale
    if G is None:
        return jnp.where(mask, A, 0.0)
    return A * jnp.exp(jnp.where(mask, G - G.reshape(1, -1), -jnp.inf))


def causal(C):
    i = jnp.arange(C, dtype=jnp.int32)
    return i[:, None] >= i[None, :]
