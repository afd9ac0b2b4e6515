"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2"), as the attention layers of
Kimi Linear use it: keys and values come from one low-rank latent per token, which is all the
decoding cache holds.

    q        = x W_q                  or  RMSNorm(x W_qa) W_qb  (`q_rank`)      [H, n + r]
    [c, k_r] = x W_kva                c: the latent [kv_rank], k_r [r] shared by every head
    c        = RMSNorm(c)
    [k_n, v] = c W_kvb                per head: [n], [d_v]
    k        = [k_n | k_r]            the last r channels of every head's key are k_r
    q, k_r   = RoPE on the last r channels of q, and on k_r   (`rope_theta`; None: no RoPE)
    o        = softmax(q k^T / sqrt(n + r)) v      causal, packed documents as in `Attention`
    y        = o W_o

Kimi Linear's MLA has no RoPE at all (`rope_theta=None`: its attention layers take positions from
the KDA layers around them) but keeps the split: r channels of each key are one projection shared
by the heads. RoPE here is this library's (rotate-half, `attention.rope`).

Defaults (a model's own MLA): n = d_v = D / H, r = n / 2, kv_rank = D / 2, no q_rank, RoPE.

Decoding caches the normalised latent c and k_r (kv_rank + r numbers per position, against
2 H d of a KV cache) and expands the cached latents through W_kvb at every call: the memory of
MLA, not yet its decoding compute (folding W_kvb into q and W_o would attend in the latent
space). Positions, document masks and the cache's bookkeeping are `Attention`'s (`LM` sizes and
checks the cache as an attention layer's). Sequence parallelism (`seq_parallel=`, calls without
a cache): the projections, norm and RoPE on the T-split activations; the attention all-gathers
the latents [c | k_r] (kv_rank + r per position, not K, V) and expands them on every device
(`linear_jax.parallel.latent`).

Parameters: D H (n + r) (or D q_rank + q_rank + q_rank H (n + r)) + D (kv_rank + r) + kv_rank
+ kv_rank H (n + d_v) + H d_v D.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.attention import Attention, documents, rope
from linear_jax.layers.common import (
    DEFAULT_STD,
    RMSNorm,
    dense,
    heads,
    merge_heads,
    new_seg,
    out_std,
)
from linear_jax.parallel import dispatch


class MLA(Attention):
    SEQ_PARALLEL = True

    def __init__(self, d_model: int, num_heads: int, *, attn_heads: int | None = None,
                 q_rank: int | None = None, kv_rank: int | None = None,
                 nope_dim: int | None = None, rope_dim: int | None = None,
                 v_dim: int | None = None, rope_theta: float | None = 10000.0,
                 norm_eps: float = 1e-6, impl: str = "auto", num_layers: int | None = None,
                 std: float = DEFAULT_STD, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        # `attn_heads` overrides the model-wide num_heads (hybrids whose linear layers have others)
        H = attn_heads or num_heads
        Dh = d_model // H
        self.H, self.window, self.block_size, self.rope_theta = H, None, None, rope_theta
        self.n, self.r, self.dv = nope_dim or Dh, rope_dim or Dh // 2, v_dim or Dh
        self.kv_rank = kv_rank or d_model // 2
        if impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"MLA: impl must be 'auto', 'xla' or 'cudnn', got {impl!r}")
        if rope_theta is not None and self.r % 2:
            raise ValueError(f"MLA: rope_dim={self.r} must be even to take RoPE")
        self.implementation = None if impl == "auto" else impl
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=std)
        norm = partial(RMSNorm, eps=norm_eps, axis=None, rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype)
        qk = H * (self.n + self.r)
        if q_rank:
            self.q_a_proj, self.q_a_norm = mk(d_model, q_rank, ("embed", None)), norm(q_rank)
            self.q_b_proj = mk(q_rank, qk, (None, "heads"))
        else:
            self.q_proj = mk(d_model, qk, ("embed", "heads"))
        self.q_rank = q_rank
        self.kv_a_proj = mk(d_model, self.kv_rank + self.r, ("embed", None))
        self.kv_a_norm = norm(self.kv_rank)
        self.kv_b_proj = mk(self.kv_rank, H * (self.n + self.dv), (None, "heads"))
        self.o_proj = dense(H * self.dv, d_model, ("heads", "embed"), rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype, std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, *, max_len: int) -> dict:
        zb = lambda: jnp.zeros((batch_size,), jnp.int32)
        return {"c": jnp.zeros((batch_size, max_len, self.kv_rank), dtype),
                "k_rope": jnp.zeros((batch_size, max_len, self.r), dtype),
                "doc": jnp.zeros((batch_size, max_len), jnp.int32),
                "index": jnp.zeros((), jnp.int32), "doc_last": zb(), "start": zb(),
                "seg": new_seg(batch_size)}

    def _kv(self, kv_b_proj, c, k_rope, dtype):
        """Every head's K, V [B, S, H, d] from the latents c [B, S, kv_rank] and the roped k_r
        [B, S, r] through `kv_b_proj`, zero-padded to one head dim, as `_pad`."""
        k_nope, v = jnp.split(heads(kv_b_proj(c), self.H), [self.n], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(
            k_rope[:, :, None].astype(k_nope.dtype), k_nope.shape[:3] + (self.r,))], -1)
        return self._pad(k), self._pad(v.astype(dtype))

    def _pad(self, x):
        """dot_product_attention wants one head dim: zero channels pad the narrower of qk and v
        (zero key channels add nothing to a score; zero value channels are cut off the
        output)."""
        d = max(self.n + self.r, self.dv)
        return jnp.pad(x, ((0, 0),) * 3 + ((0, d - x.shape[-1]),))

    def _out(self, o):
        return self.o_proj(merge_heads(o[..., :self.dv]))

    def _attend(self, q, c, k_rope, **mask):
        """q [B, T, H, n + r] against the latents c [B, S, kv_rank], k_rope [B, S, r]; `mask`:
        dot_product_attention's `mask=` or `is_causal=`."""
        k, v = self._kv(self.kv_b_proj, c, k_rope, q.dtype)
        o = jax.nn.dot_product_attention(self._pad(q), k, v, **mask, scale=self._scale,
                                         implementation=self.implementation)
        return self._out(o)

    @property
    def _scale(self) -> float:
        return (self.n + self.r) ** -0.5

    def _attend_parallel(self, q, c, k_rope, segment_ids, seq_parallel):
        """The sequence-parallel call: the latents [c | k_r] are all-gathered, not K, V, and
        expanded on every device through the (replicated) `kv_b_proj`."""
        graphdef, params = nnx.split(self.kv_b_proj)

        def expand(params, latents):
            c, k_rope = jnp.split(latents, [self.kv_rank], axis=-1)
            return self._kv(nnx.merge(graphdef, params), c, k_rope, q.dtype)

        o = dispatch.latent_attention(
            self._pad(q), jnp.concatenate([c, k_rope], -1), params, expand=expand,
            seq_parallel=seq_parallel, scale=self._scale, segment_ids=segment_ids)
        return self._out(o)

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        sp = dispatch.is_active(seq_parallel)
        if sp and cache is not None:
            raise NotImplementedError("MLA: decoding with a cache is not sequence-parallel; "
                                      "call with seq_parallel=None")
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(
            self.q_a_norm(self.q_a_proj(x)))
        q = heads(q, self.H)
        c, k_rope = jnp.split(self.kv_a_proj(x), [self.kv_rank], axis=-1)
        c = self.kv_a_norm(c)
        index = 0 if cache is None else cache["index"]
        pos = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
        doc, start = documents(pos, segment_ids, cache)
        if self.rope_theta is not None:
            q = jnp.concatenate([q[..., :self.n], rope(q[..., self.n:], pos - start,
                                                       self.rope_theta)], -1)
            k_rope = rope(k_rope[:, :, None], pos - start, self.rope_theta)[:, :, 0]
        if sp:
            return self._attend_parallel(q, c, k_rope, segment_ids, seq_parallel), None
        if cache is None:
            mask = (dict(is_causal=True) if segment_ids is None else
                    dict(mask=self._mask(pos, doc, pos, doc, start)))
            return self._attend(q, c, k_rope, **mask), None
        upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                  index, axis=1)
        cc, ck, cdoc = upd(cache["c"], c), upd(cache["k_rope"], k_rope), upd(cache["doc"], doc)
        pos_k = jnp.broadcast_to(jnp.arange(cc.shape[1], dtype=jnp.int32), cdoc.shape)
        y = self._attend(q, cc.astype(c.dtype), ck, mask=self._mask(pos, doc, pos_k, cdoc, start))
        seg = cache["seg"] if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)
        return y, {"c": cc, "k_rope": ck, "doc": cdoc, "index": index + T,
                   "doc_last": doc[:, -1], "start": start[:, -1], "seg": seg}
