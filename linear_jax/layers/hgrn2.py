"""HGRN2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion").

    f_t = lb + (1 - lb) sigmoid(x W_f)     (forget gate, lower bound lb)
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T,     o_t = S_t^T swish(x W_q),     i_t = x W_i
    y = GroupRMSNorm(o) W_o

HGRN's element-wise recurrence with the input gate tied to the forget gate (k = 1 - f) and the
hidden state expanded by an outer product: the forget dimension of each head is `expand_ratio`.
The paper learns lower bounds that rise with depth across the stack; here `lower_bound` is a fixed
per-layer constant (0 by default). Op: `linear_jax.ops.gla` with g = log f and k = 1 - exp(g).

In the shared body the "key" projection holds the forget-gate logits and the "value" projection the
input i. Parameters: D (2 H E + D) + D^2 + D/H, E = expand_ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linear_jax.layers.base import QKVMixer
from linear_jax.parallel.dispatch import recurrence


class HGRN2(QKVMixer):
    def __init__(self, d_model: int, num_heads: int, *, expand_ratio: int | None = None,
                 lower_bound: float = 0.0, **kw):
        E = expand_ratio or d_model // num_heads
        super().__init__(d_model, num_heads, key_dim=E, value_dim=d_model // num_heads, **kw)
        self.lower_bound = lower_bound

    def mix(self, x, q, f, v, states, segment_ids, seq_parallel=None):
        f = f.astype(jnp.float32)
        if self.lower_bound:
            g = jnp.log(self.lower_bound + (1 - self.lower_bound) * jax.nn.sigmoid(f))
        else:
            g = jax.nn.log_sigmoid(f)
        o, S = recurrence("gla", jax.nn.silu(q), -jnp.expm1(g), v, g,
                          initial_state=states["state"], segment_ids=segment_ids,
                          seq_parallel=seq_parallel, **dict(self.op_kw))
        return o, {"state": S}
