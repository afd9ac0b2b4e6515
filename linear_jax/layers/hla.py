"""Second-order Higher-order Linear Attention (Zhang, Qin & Gu 2025, "Higher-order Linear
Attention"), strictly causal, from streaming prefix statistics:

    S_t = S_{t-1} + k_t k_t^T     C_t = C_{t-1} + q_t v_t^T     G_t = G_{t-1} + k_t (k_t^T C_{t-1})
    o_t = q_t^T (S_t C_t - G_t)  =  sum_{i <= j <= t} (q_t . k_i) (k_i . q_j) v_j

Each statistic is a linear-attention state, so the layer is three calls of the
`linear_attention` op, with no new recurrence:

    u_t = S_t q_t                 linear attention (query q, key k, value k)      state S [K, K]
    a_t = C_t^T u_t               linear attention (query u, key q, value v)      state C [K, V]
    w_t = C_{t-1}^T k_t           the same keys and values queried by k, minus its own term
    o_t = a_t - sum_{i<=t} (q_t . k_i) w_i    linear attention (query q, key k, value w),  state G

Every inner product carries the usual K^-1/2 scale; the unnormalised output grows with t^2, so the
per-head RMS output norm (and the swish output gate) of modern linear attention follow it.

Parameters: 5 D^2 + V (q, k, v, gate, out; H K = H V = D).
State: S [B, H, K, K], C [B, H, K, V], G [B, H, K, V] float32.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.layers.base import QKVMixer
from linear_jax.parallel.dispatch import recurrence


class HLA(QKVMixer):
    def __init__(self, d_model: int, num_heads: int, **kw):
        kw.setdefault("output_gate", True)
        K = d_model // num_heads
        super().__init__(d_model, num_heads, key_dim=K, value_dim=K, **kw)

    def init_states(self, batch_size: int) -> dict:
        z = lambda *s: jnp.zeros((batch_size, self.H) + s, jnp.float32)
        return {"S": z(self.K, self.K), "C": z(self.K, self.V), "G": z(self.K, self.V)}

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        la = lambda q_, k_, v_, s: recurrence("linear_attention", q_, k_, v_, initial_state=s,
                                              segment_ids=segment_ids,
                                              seq_parallel=seq_parallel, **dict(self.op_kw))
        f32 = lambda a: a.astype(jnp.float32)
        q, k, v = f32(q), f32(k), f32(v)
        u, S = la(q, k, k, states["S"])
        a, C = la(u, q, v, states["C"])
        w, _ = la(k, q, v, states["C"])
        w = w - jnp.sum(k * q, -1, keepdims=True) * self.K ** -0.5 * v
        b, G = la(q, k, w, states["G"])
        return a - b, {"S": S, "C": C, "G": G}
