"""Gated softmax attention (Qiu et al. 2025, "Gated Attention for Large Language Models"; the
attention layers of Qwen3-Next): `Attention` with an output gate per head and channel, RMS norms
on the query and key heads, and rotary positions on part of each head.

    [q_h, g_h] = x W_q                  one projection, per head the query then its gate [2 Dh]
    q, k = RMSNorm(q), RMSNorm(k)       per head, zero-centred scale (1 + w)
    q, k = RoPE on the first `rotary_dim` channels of each head (the rest pass)
    o    = softmax(q k^T / sqrt(Dh)) v  causal, GQA, packed documents as in `Attention`
    y    = (o * sigmoid(g)) W_o

The gate makes the attention output sparse and input-dependent and removes the attention sink.
Everything about positions, masks, the KV cache and sequence parallelism is `Attention.attend`'s:
the gate and the norms act per token, so under `seq_parallel` they run on the T-split
activations and only the softmax crosses devices. Parameters: D (2 H + 2 Hk) Dh + H Dh D + 2 Dh.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.attention import Attention
from linear_jax.layers.common import DEFAULT_STD, RMSNorm, dense, heads, merge_heads


class GatedAttention(Attention):
    def __init__(self, d_model: int, num_heads: int, *, attn_heads: int | None = None,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 rotary_dim: int | None = None, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-6, impl: str = "auto", num_layers: int | None = None,
                 std: float = DEFAULT_STD, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        # `attn_heads` overrides the model-wide num_heads (hybrids whose linear layers have others)
        H = attn_heads or num_heads
        super().__init__(d_model, H, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         rope_theta=rope_theta, rotary_dim=rotary_dim, impl=impl,
                         num_layers=num_layers, std=std, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
        self.q_proj = dense(d_model, 2 * H * self.Dh, ("embed", "heads"), rngs=rngs,
                            dtype=dtype, param_dtype=param_dtype, std=std)
        norm = partial(RMSNorm, self.Dh, eps=norm_eps, axis="kv", rngs=rngs, dtype=dtype,
                       param_dtype=param_dtype, offset=1.0)
        self.q_norm, self.k_norm = norm(), norm()

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        q, gate = jnp.split(heads(self.q_proj(x), self.H), 2, axis=-1)
        q, k = self.q_norm(q), self.k_norm(heads(self.k_proj(x), self.Hk))
        o, cache = self.attend(q, k, heads(self.v_proj(x), self.Hk), segment_ids, cache,
                               seq_parallel)
        return self.o_proj(merge_heads(o * jax.nn.sigmoid(gate))), cache
