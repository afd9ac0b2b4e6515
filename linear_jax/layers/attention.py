"""Causal softmax attention (Vaswani et al. 2017) with grouped KV heads (GQA; Ainslie et al.
2023), rotary positions (RoPE; Su et al. 2021) on the whole head or its first `rotary_dim`
channels, an optional sliding window (Longformer / Mistral; the softmax half of Based; Griffin's
local attention), or block-local attention (TNL's DiagAttention: each token attends to the
earlier tokens of its own block of `block_size`).

Training calls `jax.nn.dot_product_attention`, which takes cuDNN's flash attention on GPU when the
mask is plain causal (+ window); packed documents add a document mask. Positions restart at each
document, so packed == separate exactly.

Decoding uses a preallocated KV cache of `max_len` slots with a write index: a call on T tokens
writes slots [index, index + T) and attends over the written slots (cost O(max_len) per token,
the baseline the linear mixers are measured against). The caller sizes the cache; the layer
itself does not check a write past `max_len` (under jit it cannot raise): `LM.__call__` does,
raising where the overflow is known at trace time and giving NaN logits where it is not.
With a sliding window (and no blocks) the cache is instead the last `window - 1` tokens
(`rolling`): a call attends over [those | its own tokens] and keeps the last `window - 1` of
them, so its size is constant in the context length and `max_len` is not needed.

Sequence parallelism (`seq_parallel=SeqParallel(mesh)`, training calls without a cache): the
projections and RoPE (positions and document starts of the global order) run on the T-split
activations, the attention itself through `linear_jax.parallel.dispatch.attention` (K, V
all-gathered along the axis, LASP-2H; contiguous or zigzag layout). `attend` holds everything
but the projections, so a subclass with projections of its own (`GatedAttention`) inherits the
positions, masks, caches and the sequence-parallel path.

Parameters: D (H + 2 Hk) Dh + H Dh D (q, k, v, o) (+ D with `out_bias`). Cache: k, v
[B, L, Hk, Dh], the position and document index of each slot `pos`, `doc` [B, L], `index`, and
per row the current document's number and start position (L = max_len, or window - 1).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import DEFAULT_STD, dense, heads, merge_heads, new_seg, out_std
from linear_jax.parallel import dispatch


def documents(pos, segment_ids, cache=None):
    """Document number and start position of every new token ([B, T] each) at positions pos
    [B, T], from `segment_ids` (a change starts a document) and an attention layer's cache (the
    documents before them). Also how `LM` finds the in-document positions it embeds."""
    B, T = pos.shape
    doc0 = jnp.zeros((B, 1), jnp.int32) if cache is None else cache["doc_last"][:, None]
    start0 = jnp.zeros((B, 1), jnp.int32) if cache is None else cache["start"][:, None]
    if segment_ids is None:     # no resets; a cumsum of constants would be folded slowly
        return jnp.broadcast_to(doc0, (B, T)), jnp.broadcast_to(start0, (B, T))
    first = jnp.zeros((B, 1), bool) if cache is None else \
        (segment_ids[:, :1] != cache["seg"][:, None]) & (cache["index"] > 0)
    reset = jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    doc = doc0 + jnp.cumsum(reset, 1, dtype=jnp.int32)
    start = jax.lax.cummax(jnp.where(reset, pos, start0), axis=1)
    return doc, start


def rope(x, pos, theta: float):
    """Rotates pairs (x_i, x_{i + d/2}) of x [B, T, H, d] by pos [B, T] * theta^(-2i/d)."""
    d = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(d, dtype=jnp.float32) / d)
    ang = pos.astype(jnp.float32)[..., None, None] * freq            # [B, T, 1, d]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = jnp.cos(ang), jnp.sin(ang)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).astype(x.dtype)


class Attention(nnx.Module):
    SEQ_PARALLEL = True
    OP_IMPL = False      # `impl` picks the softmax backend ("auto", "xla", "cudnn"), not an op's

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, window: int | None = None,
                 block_size: int | None = None, rope_theta: float | None = 10000.0,
                 rotary_dim: int | None = None, out_bias: bool = False, impl: str = "auto",
                 num_layers: int | None = None, std: float = DEFAULT_STD, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        self.H, self.Hk = num_heads, num_kv_heads or num_heads
        if self.H % self.Hk:
            raise ValueError(f"num_heads={self.H} must be a multiple of num_kv_heads={self.Hk}")
        self.Dh = head_dim or d_model // num_heads
        self.window, self.block_size, self.rope_theta = window, block_size, rope_theta
        if window is not None and window < 1:
            raise ValueError(f"{type(self).__name__}: window must be >= 1, got {window}")
        self.rotary_dim = rotary_dim or self.Dh
        if self.rotary_dim % 2 or self.rotary_dim > self.Dh:
            raise ValueError(f"{type(self).__name__}: rotary_dim={self.rotary_dim} must be even "
                             f"and at most head_dim={self.Dh}")
        if impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"Attention: impl must be 'auto', 'xla' or 'cudnn', got {impl!r}")
        self.implementation = None if impl == "auto" else impl
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = mk(d_model, self.H * self.Dh, ("embed", "heads"), std=std)
        self.k_proj = mk(d_model, self.Hk * self.Dh, ("embed", "heads"), std=std)
        self.v_proj = mk(d_model, self.Hk * self.Dh, ("embed", "heads"), std=std)
        self.o_proj = mk(self.H * self.Dh, d_model, ("heads", "embed"),
                         std=out_std(std, num_layers), use_bias=out_bias)

    @property
    def rolling(self) -> bool:
        """Whether the decoding cache holds the last `window - 1` tokens (constant size) rather
        than `max_len` slots."""
        return self.window is not None and self.block_size is None

    def init_cache(self, batch_size: int, dtype=jnp.float32, *, max_len: int | None = None
                   ) -> dict:
        if self.rolling:
            L = self.window - 1
            # empty slots sit a whole window before position 0: no query ever sees them
            pos = jnp.full((batch_size, L), -self.window, jnp.int32)
        elif max_len is None:
            raise ValueError(f"{type(self).__name__}: the KV cache needs max_len (the prompt "
                             f"plus the tokens to generate) unless a window bounds it")
        else:
            L = max_len
            # unwritten slots lie in the future of every query: the causal mask hides them
            pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (batch_size, L))
        # distinct arrays for every entry, so the whole cache can be donated
        kv = lambda: jnp.zeros((batch_size, L, self.Hk, self.Dh), dtype)
        zb = lambda: jnp.zeros((batch_size,), jnp.int32)
        return {"k": kv(), "v": kv(), "pos": pos, "doc": jnp.zeros((batch_size, L), jnp.int32),
                "index": jnp.zeros((), jnp.int32), "doc_last": zb(), "start": zb(),
                "seg": new_seg(batch_size)}

    def _mask(self, pos_q, doc_q, pos_k, doc_k, start_q):
        """bool [B, 1, Tq, Tk]: causal, same document, inside the window / block."""
        m = (pos_k[:, None, :] <= pos_q[:, :, None]) & (doc_k[:, None, :] == doc_q[:, :, None])
        if self.window is not None:
            m &= pos_q[:, :, None] - pos_k[:, None, :] < self.window
        if self.block_size is not None:
            blk = lambda p: (p - start_q[..., None]) // self.block_size   # in-document blocks
            m &= blk(pos_k[:, None, :]) == blk(pos_q[:, :, None])
        return m[:, None]

    def _rope(self, x, pos):
        if self.rope_theta is None:
            return x
        r = self.rotary_dim
        if r == self.Dh:
            return rope(x, pos, self.rope_theta)
        return jnp.concatenate([rope(x[..., :r], pos, self.rope_theta), x[..., r:]], -1)

    def attend(self, q, k, v, segment_ids, cache, seq_parallel):
        """Softmax attention of the heads q [B, T, H, Dh] over k, v [B, T, Hk, Dh] (before RoPE)
        and the cached keys: -> (o [B, T, H, Dh], new cache or None when called without one).
        Positions, RoPE, masks and the cache are here, so that a subclass supplies only its
        projections."""
        sp = dispatch.is_active(seq_parallel)
        if sp and cache is not None:
            raise NotImplementedError(f"{type(self).__name__}: decoding with a KV cache is not "
                                      f"sequence-parallel; call with seq_parallel=None")
        B, T = q.shape[:2]
        index = 0 if cache is None else cache["index"]
        pos = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
        doc, start = documents(pos, segment_ids, cache)
        q, k = self._rope(q, pos - start), self._rope(k, pos - start)
        attend = partial(jax.nn.dot_product_attention, implementation=self.implementation)
        if sp:
            return dispatch.attention(q, k, v, seq_parallel=seq_parallel, segment_ids=segment_ids,
                                      window=self.window, block_size=self.block_size), None
        if cache is None:
            if segment_ids is None and self.block_size is None:
                window = None if self.window is None else (self.window - 1, 0)
                return attend(q, k, v, is_causal=True, local_window_size=window), None
            return attend(q, k, v, mask=self._mask(pos, doc, pos, doc, start)), None
        new = {"k": k, "v": v, "pos": pos, "doc": doc}
        if self.rolling:        # [the last window - 1 tokens | the new ones], then the last again
            ctx = {n: jnp.concatenate([cache[n], a.astype(cache[n].dtype)], 1)
                   for n, a in new.items()}
            kept = {n: a[:, T:] for n, a in ctx.items()}
        else:
            ctx = kept = {n: jax.lax.dynamic_update_slice_in_dim(
                cache[n], a.astype(cache[n].dtype), index, axis=1) for n, a in new.items()}
        o = attend(q, ctx["k"].astype(q.dtype), ctx["v"].astype(q.dtype),
                   mask=self._mask(pos, doc, ctx["pos"], ctx["doc"], start))
        seg = cache["seg"] if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)
        return o, {**kept, "index": index + T, "doc_last": doc[:, -1], "start": start[:, -1],
                   "seg": seg}

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        """x [B, T, D] -> (y [B, T, D], new cache or None when called without one).
        `seq_parallel`: T split over its mesh (calls without a cache only)."""
        q, k, v = heads(self.q_proj(x), self.H), heads(self.k_proj(x), self.Hk), \
            heads(self.v_proj(x), self.Hk)
        o, cache = self.attend(q, k, v, segment_ids, cache, seq_parallel)
        return self.o_proj(merge_heads(o)), cache
