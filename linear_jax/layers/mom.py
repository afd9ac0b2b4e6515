"""Mixture-of-Memories (Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories"):
M separate memories per head, each a Gated DeltaNet state with its own key and value projections;
a router sends each token to the top-k memories, which alone are written, and the token reads the
memories it was routed to, mixed by the router weights, plus a shared memory every token uses.

    r_t = softmax(x W_r)[top-k], renormalised           w_tm = r_tm for routed m, else 0
    S^m_t = S^m_{t-1}                                   memory m not routed: untouched
    S^m_t = exp(g^m_t) (I - beta^m_t k^m_t k^m_t^T) S^m_{t-1} + beta^m_t k^m_t v^m_t^T   routed
    o_t = sum_m w_tm S^m_t^T q_t + S^shared_t^T q_t,      y = (RMSNorm_V(o) * swish(x W_g)) W_o

The M + 1 memories run as one `gated_delta_rule` over H (M + 1) heads; a memory a token is not
routed to gets beta = 0 and g = 0 there, the identity step. Short convs, l2-normalised q, k and
the Mamba-2 decay as Gated DeltaNet. The router's load-balancing loss is not returned (the layer
contract returns only (y, cache)); top-k routing is trained through the mixing weights.

Parameters: D (H K + (M+1) H (K + V)) + D M + (M+1) (D H + 2 H) + (M+1) D H + 2 H V D + V
+ 4 (H K + (M+1) H (K + V)) (conv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linear_jax.layers.base import QKVMixer
from linear_jax.layers.common import DecayGate, dense
from linear_jax.ops.norms import l2norm
from linear_jax.parallel.dispatch import recurrence


class MoM(QKVMixer):
    def __init__(self, d_model: int, num_heads: int, *, num_memories: int = 4, top_k: int = 2,
                 conv_size: int = 4, rngs, dtype=None, param_dtype=jnp.float32, **kw):
        if not 1 <= top_k <= num_memories:
            raise ValueError(f"top_k={top_k} must be in [1, num_memories={num_memories}]")
        K = d_model // num_heads
        kw.setdefault("output_gate", True)
        M1 = num_memories + 1
        super().__init__(d_model, num_heads, key_dim=K, value_dim=K, steps=M1,
                         conv_size=conv_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         **kw)
        self.M, self.top_k = num_memories, top_k
        self.router = dense(d_model, num_memories, ("embed", None), rngs=rngs, dtype=jnp.float32,
                            param_dtype=param_dtype, std=self.std)
        self.b_proj = dense(d_model, M1 * num_heads, ("embed", "heads"), rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype, std=self.std)
        self.decay = DecayGate(d_model, M1 * num_heads, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype, std=self.std)

    def init_states(self, batch_size: int) -> dict:
        H = (self.M + 1) * self.H
        return {"state": jnp.zeros((batch_size, H, self.K, self.V), jnp.float32)}

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        B, T, H, M1 = x.shape[0], x.shape[1], self.H, self.M + 1
        probs = jax.nn.softmax(self.router(x.astype(jnp.float32)), -1)
        top_p, top_m = jax.lax.top_k(probs, self.top_k)
        weights = jnp.einsum("btk,btkm->btm", top_p / top_p.sum(-1, keepdims=True),
                             jax.nn.one_hot(top_m, self.M, dtype=jnp.float32))
        weights = jnp.concatenate([weights, jnp.ones((B, T, 1), jnp.float32)], -1)  # + shared
        written = jnp.repeat(weights > 0, H, axis=-1)                           # [B, T, M1 H]
        beta = jnp.where(written, jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32)), 0.0)
        g = jnp.where(written, self.decay(x), 0.0)
        q = jnp.tile(l2norm(q), (1, 1, M1, 1))           # memory-major heads: (memory, head)
        o, S = recurrence("gated_delta_rule", q, l2norm(k), v, g, beta,
                          initial_state=states["state"], segment_ids=segment_ids,
                          seq_parallel=seq_parallel, **dict(self.op_kw))
        o = jnp.einsum("btmhv,btm->bthv", o.reshape(B, T, M1, H, -1).astype(jnp.float32),
                       weights)
        return o, {"state": S}
