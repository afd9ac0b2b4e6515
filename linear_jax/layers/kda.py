"""Kimi Delta Attention (Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Hybrid Linear
Attention Architecture").

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v));  q, k l2-normalised
    beta_t = sigmoid(x W_b)                    (2 sigmoid with `allow_neg_eigval`)
    g_t = -exp(A_log) softplus(x W_f1 W_f2 + dt_bias)          per head and key channel
    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t / sqrt(K)
    y = (RMSNorm_V(o) * sigmoid(x W_g1 W_g2 + b_g)) W_o

As the paper's layer: short convolutions of width 4, a low-rank (rank V) decay projection with a
per-channel dt_bias and a per-head A (uniform in [1, 16]), a low-rank sigmoid output gate and a
per-head output norm (`gate_bias=False`: a gate without bias, as Kimi Linear's released layer and
transformers' `KimiLinearDeltaAttention` have it). One departure: dt_bias is drawn as Mamba-2's
and Gated DeltaNet's (softplus(dt_bias) log-uniform in [1e-3, 1e-1]); the reference layer starts
it at 0, which decays the state by exp(-0.69 A) per step at init: a 2-layer model at width 64
stayed near chance on a copy task after 300 Adam steps (2.70 nats, chance 2.77) where this init
reached 0.03.
Op: `linear_jax.ops.kda`.

Parameters: DeltaNet's (without its gate) + D V + V H K + H + H K (decay) + D V + V H V + H V
(output gate, its bias with `gate_bias`); with H K = H V = D: 4 D^2 + D H + 12 D + D/H + 4 D^2/H
+ H + 2 D.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from linear_jax.layers.common import a_log_init, dense, dt_bias_init, heads, merge_heads, param
from linear_jax.layers.deltanet import DeltaNet
from linear_jax.parallel.dispatch import recurrence


class KDA(DeltaNet):
    def __init__(self, d_model: int, num_heads: int, *, gate_bias: bool = True, rngs, dtype=None,
                 param_dtype=jnp.float32, **kw):
        kw.setdefault("gate_activation", jax.nn.sigmoid)
        super().__init__(d_model, num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         **kw)
        H, K, V = self.H, self.K, self.V
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype, std=self.std)
        self.f_down = mk(d_model, V, ("embed", None))
        self.f_up = mk(V, H * K, (None, "heads"))
        self.A_log = param(rngs, a_log_init, (H,), ("heads",), param_dtype)
        self.dt_bias = param(rngs, dt_bias_init, (H * K,), ("heads",), param_dtype)
        self.gate_down = mk(d_model, V, ("embed", None))
        self.gate_up = mk(V, H * V, (None, "heads"), use_bias=gate_bias)

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        q, k, beta = self.qkb(x, q, k)
        f = self.f_up(self.f_down(x)).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        A = jnp.exp(self.A_log[...].astype(jnp.float32))
        g = -A[:, None] * jax.nn.softplus(heads(f, self.H))
        o, S = recurrence("kda", q, k, v, g, beta, initial_state=states["state"],
                          segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))
        return o, {"state": S}

    def output(self, o, x):
        gate = heads(self.gate_up(self.gate_down(x)), self.H)
        return self.o_proj(merge_heads(self.o_norm(o, gate)))
