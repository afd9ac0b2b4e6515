"""Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

    g_t = -exp(A_log) softplus(x W_a + dt_bias)                      (Mamba-2's decay, per head)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t / sqrt(K)
    y = (RMSNorm_V(o) * swish(x W_g)) W_o

q, k, v, beta and the short convolutions as in DeltaNet; value heads twice the key width
(expand_v = 2) and a gated output norm, as in the paper. Op: `linear_jax.ops.gated_delta_rule`.

Parameters: D (2 H K + 2 H V) + H V D + 2 D H + 2 H + V + 4 (2 H K + H V);
with H K = D, V = 2 K: 8 D^2 + 2 D H + 2 H + 16 D + 2 D/H.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.layers.common import DecayGate
from linear_jax.layers.deltanet import DeltaNet
from linear_jax.parallel.dispatch import recurrence


class GatedDeltaNet(DeltaNet):
    def __init__(self, d_model: int, num_heads: int, *, expand_v: float = 2.0, rngs,
                 dtype=None, param_dtype=jnp.float32, **kw):
        kw.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, expand_v=expand_v, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, **kw)
        self.decay = DecayGate(d_model, num_heads, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype, std=self.std)

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        q, k, beta = self.qkb(x, q, k)
        o, S = recurrence("gated_delta_rule", q, k, v, self.decay(x), beta, exact=self.exact,
                          initial_state=states["state"], segment_ids=segment_ids,
                          seq_parallel=seq_parallel, **dict(self.op_kw))
        return o, {"state": S}
