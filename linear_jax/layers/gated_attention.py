"""Gated softmax attention (Qiu et al. 2025, "Gated Attention for Large Language Models"; the
attention layers of Qwen3-Next): `Attention` with an output gate per head and channel, RMS norms
on the query and key heads, and rotary positions on part of each head.

    [q_h, g_h] = x W_q                  one projection, per head the query then its gate [2 Dh]
    q, k = RMSNorm(q), RMSNorm(k)       per head, zero-centred scale (1 + w)
    q, k = RoPE on the first `rotary_dim` channels of each head (the rest pass)
    o    = softmax(q k^T / sqrt(Dh)) v  causal, GQA, packed documents as in `Attention`
    y    = (o * sigmoid(g)) W_o

The gate makes the attention output sparse and input-dependent and removes the attention sink.
Everything about positions, masks and the KV cache is `Attention`'s. Parameters: D (2 H + 2 Hk) Dh
+ H Dh D + 2 Dh.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.attention import Attention, rope
from linear_jax.layers.common import DEFAULT_STD, RMSNorm, dense, heads, merge_heads
from linear_jax.parallel import dispatch


class GatedAttention(Attention):
    SEQ_PARALLEL = False     # its own projections are not wired into the parallel path yet

    def __init__(self, d_model: int, num_heads: int, *, attn_heads: int | None = None,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 rotary_dim: int | None = None, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-6, impl: str = "auto", num_layers: int | None = None,
                 std: float = DEFAULT_STD, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        # `attn_heads` overrides the model-wide num_heads (hybrids whose linear layers have others)
        H = attn_heads or num_heads
        super().__init__(d_model, H, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         rope_theta=rope_theta, impl=impl, num_layers=num_layers, std=std,
                         rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.rotary_dim = rotary_dim or self.Dh
        if self.rotary_dim % 2 or self.rotary_dim > self.Dh:
            raise ValueError(f"GatedAttention: rotary_dim={self.rotary_dim} must be even and at "
                             f"most head_dim={self.Dh}")
        self.q_proj = dense(d_model, 2 * H * self.Dh, ("embed", "heads"), rngs=rngs,
                            dtype=dtype, param_dtype=param_dtype, std=std)
        norm = partial(RMSNorm, self.Dh, eps=norm_eps, axis="kv", rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype, offset=1.0)
        self.q_norm, self.k_norm = norm(), norm()

    def _rope(self, x, pos):
        r = self.rotary_dim
        return jnp.concatenate([rope(x[..., :r], pos, self.rope_theta), x[..., r:]], -1)

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        dispatch.unsupported(self, seq_parallel)
        B, T, _ = x.shape
        q, gate = jnp.split(heads(self.q_proj(x), self.H), 2, axis=-1)
        q, k = self.q_norm(q), self.k_norm(heads(self.k_proj(x), self.Hk))
        v = heads(self.v_proj(x), self.Hk)
        index = 0 if cache is None else cache["index"]
        pos = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
        doc, start = self._docs(pos, segment_ids, cache)
        q, k = self._rope(q, pos - start), self._rope(k, pos - start)
        attend = partial(jax.nn.dot_product_attention, implementation=self.implementation)
        out = lambda o: self.o_proj(merge_heads(o * jax.nn.sigmoid(gate)))
        if cache is None:
            if segment_ids is None:
                return out(attend(q, k, v, is_causal=True)), None
            return out(attend(q, k, v, mask=self._mask(pos, doc, pos, doc, start))), None
        upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                  index, axis=1)
        ck, cv, cdoc = upd(cache["k"], k), upd(cache["v"], v), upd(cache["doc"], doc)
        pos_k = jnp.broadcast_to(jnp.arange(ck.shape[1], dtype=jnp.int32), cdoc.shape)
        o = attend(q, ck.astype(q.dtype), cv.astype(q.dtype),
                   mask=self._mask(pos, doc, pos_k, cdoc, start))
        seg = cache["seg"] if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)
        return out(o), {"k": ck, "v": cv, "doc": cdoc, "index": index + T,
                        "doc_last": doc[:, -1], "start": start[:, -1], "seg": seg}
