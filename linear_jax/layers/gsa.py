"""Gated Slot Attention (Zhang et al. 2024, "Gated Slot Attention for Efficient Linear-Time
Sequence Modeling"): a bounded memory of m slots per head, written with forget gates and read
with a softmax over the slots, i.e. two passes of gated linear attention.

    alpha_t = sigmoid(x W_f)^(1/tau)                                          [m] per head
    K~_t = diag(alpha_t) K~_{t-1} + (1 - alpha_t) k_t^T,   s_t = K~_t q_t      [m]   (pass 1)
    V~_t = diag(alpha_t) V~_{t-1} + (1 - alpha_t) v_t^T,   o_t = V~_t^T softmax(s_t)   (pass 2)
    y = RMSNorm_V(o) W_o

q, k, v pass through swish; tau = 8 (the paper's gate normaliser); m = 64 slots in the paper.
Pass 2 is `gla` with query softmax(s), key 1 - alpha, log decay log alpha over the m slots. Pass 1
decays the axis it does not contract, which `gla` does not express; each slot is a head of
`simple_gla` with a scalar decay instead (the H query/key heads grouped over H m value heads of
width 1): exact and stable, at m times the intra-chunk work of one head.

Parameters: D (2 H K + H V + H m) + H V D + V. State: pass 1 [B, H m, K, 1], pass 2 [B, H, m, V].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from linear_jax.layers.base import QKVMixer
from linear_jax.layers.common import dense, heads
from linear_jax.parallel.dispatch import recurrence


class GSA(QKVMixer):
    def __init__(self, d_model: int, num_heads: int, *, num_slots: int = 64,
                 gate_normalizer: float = 8.0, rngs, dtype=None, param_dtype=jnp.float32, **kw):
        K = d_model // num_heads
        super().__init__(d_model, num_heads, key_dim=K, value_dim=K, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, **kw)
        self.m, self.tau = num_slots, gate_normalizer
        self.f_proj = dense(d_model, num_heads * num_slots, ("embed", "heads"), rngs=rngs,
                            dtype=dtype, param_dtype=param_dtype, std=self.std)

    def init_states(self, batch_size: int) -> dict:
        B, H, m = batch_size, self.H, self.m
        return {"keys": jnp.zeros((B, H * m, self.K, 1), jnp.float32),
                "values": jnp.zeros((B, H, m, self.V), jnp.float32)}

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
        g = jax.nn.log_sigmoid(heads(self.f_proj(x), self.H).astype(jnp.float32)) / self.tau
        write = -jnp.expm1(g)                                          # 1 - alpha, [B, T, H, m]
        flat = lambda a: a.reshape(a.shape[:2] + (self.H * self.m,) + a.shape[4:])
        run = partial(dict, segment_ids=segment_ids, seq_parallel=seq_parallel,
                      **dict(self.op_kw))
        # the slot weights (1 - alpha, p) go to the kernels in the model's dtype: float32 there
        # would make every kernel input float32, which the Triton kernels multiply in IEEE float32
        s, S_keys = recurrence("simple_gla", q, k, flat(write)[..., None].astype(q.dtype),
                               flat(g), initial_state=states["keys"], **run())
        p = jax.nn.softmax(s.reshape(g.shape).astype(jnp.float32), axis=-1).astype(q.dtype)
        o, S_values = recurrence("gla", p, write.astype(q.dtype), v, g, scale=1.0,
                                 initial_state=states["values"], **run())
        return o, {"keys": S_keys, "values": S_values}
