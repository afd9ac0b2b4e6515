"""Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training").

    alpha_t = sigmoid(x W_a1 W_a2 + b)^(1/16)       g_t = logsigmoid(x W_a1 W_a2 + b) / 16
    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,         o_t = S_t^T q_t
    y = (GroupRMSNorm(o) * swish(x W_r)) W_o

Paper choices: key width half the model width (expand_k = 0.5), value width D, 4 heads, a low-rank
(16) gate projection with bias, the logit normaliser 16 that keeps alpha close to 1 at init,
swish output gate and per-head RMS norm. Op: `linear_jax.ops.gla`.

Parameters: D (2 H K + 2 H V) + H V D + (D r + r H K + H K) + V, r = 16;
with the defaults (H K = D/2, H V = D): 4 D^2 + 16 D + 8 D + D/2 + D/H.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from linear_jax.layers.base import QKVMixer
from linear_jax.layers.common import dense, heads
from linear_jax.parallel.dispatch import recurrence


class GLA(QKVMixer):
    def __init__(self, d_model: int, num_heads: int, *, expand_k: float = 0.5,
                 expand_v: float = 1.0, gate_rank: int = 16, gate_normalizer: float = 16.0,
                 rngs, dtype=None, param_dtype=jnp.float32, **kw):
        K, V = int(d_model * expand_k) // num_heads, int(d_model * expand_v) // num_heads
        kw.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, key_dim=K, value_dim=V, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, **kw)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gk_down = mk(d_model, gate_rank, ("embed", None), std=self.std)
        self.gk_up = mk(gate_rank, self.H * K, (None, "heads"), use_bias=True, std=self.std)
        self.gate_normalizer = gate_normalizer

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        logit = heads(self.gk_up(self.gk_down(x)), self.H).astype(jnp.float32)
        g = jax.nn.log_sigmoid(logit) / self.gate_normalizer
        o, S = recurrence("gla", q, k, v, g, initial_state=states["state"],
                          segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))
        return o, {"state": S}
