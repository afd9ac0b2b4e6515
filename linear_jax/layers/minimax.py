"""Lightning attention as MiniMax-01 runs it (MiniMax 2025, "MiniMax-01: Scaling Foundation
Models with Lightning Attention"): fixed-decay linear attention, no softmax, no query scaling.

    q, k, v = silu(x W_qkv)                       one projection, per head [q | k | v]
    S_t = exp(-s_h) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t
    y = (sigmoid(x W_g) * RMSNorm_{H V}(o)) W_o   the norm over all heads at once

s_h = 2^(-8 (h + 1) / H) (1 - l / (L - 1) + 1e-5) for head h of layer l of L: ALiBi's slopes,
weakened with depth (the last layer barely decays). Unlike TNL's `Lightning` the values pass
through silu too, the norm spans the whole width and the gate is a sigmoid. Op:
`linear_jax.ops.simple_gla` with the constant log decay -s_h and scale 1.

Parameters: D (3 H K) + H K D (gate) + H K D (out) + H K; with H K = D: 5 D^2 + D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from linear_jax.layers.common import RMSNorm, merge_heads
from linear_jax.layers.retnet import Retention
from linear_jax.parallel.dispatch import recurrence


def minimax_decays(H: int, layer_idx: int, num_layers: int) -> np.ndarray:
    """log decays -s_h, in float32 as the reference computes the slopes."""
    rate = np.float32(1 / 2 ** (8 / H)) ** np.arange(1, H + 1, dtype=np.float32)
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return -(rate * np.float32(factor))


class MiniMaxLightning(Retention):
    def __init__(self, d_model: int, num_heads: int, *, layer_idx: int = 0,
                 head_dim: int | None = None, norm_eps: float = 1e-6, rngs, dtype=None,
                 param_dtype=jnp.float32, **kw):
        L = kw.get("num_layers") or 1
        kw.update(output_norm=False, output_gate=True, gate_activation=jax.nn.sigmoid)
        super().__init__(d_model, num_heads, log_decay=minimax_decays(num_heads, layer_idx, L),
                         head_dim=head_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         **kw)
        self.norm = RMSNorm(self.H * self.V, eps=norm_eps, axis="heads", rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
        g = jnp.broadcast_to(self.log_decay[...].astype(jnp.float32), v.shape[:3])
        o, S = recurrence("simple_gla", q, k, v, g, scale=1.0, initial_state=states["state"],
                          segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))
        return o, {"state": S}

    def output(self, o, x):
        return self.o_proj(jax.nn.sigmoid(self.g_proj(x)) * self.norm(merge_heads(o)))
