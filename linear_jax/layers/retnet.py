"""Retention with fixed per-head decays: RetNet and Lightning Attention (TNL).

    S_t = gamma_h S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t,   y = (GroupRMSNorm(o) * swish(x W_g)) W_o

RetNet (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models"): gamma_h = 1 - 2^(-5 - h), value heads twice the key width (expand_v = 2), swish output
gate, per-head norm. We leave out the xPos rotation of q and k: the decay alone carries position,
as in TNL and fla's default retention.

Lightning / TNL (Qin et al. 2024, "TransNormerLLM" and "Various Lengths, Constant Speed: Lightning
Attention-2"): NormAttention keeps no softmax denominator and normalises the output instead;
q, k pass through swish; gamma_h = exp(-(8 h / H) (1 - l / L)) for head h of layer l of L (the first
head of every layer keeps its state undecayed, decays weaken with depth); expand_v = 1. Its early
layers use DiagAttention (block-local softmax), `Attention(block_size=...)` in this package.

Op: `linear_jax.ops.simple_gla` with the constant log decay as g.
Parameters: D (2 H K + 2 H V) + H V D + V, with H K = D: RetNet 8 D^2 + D/H * 2, TNL 5 D^2 + D/H.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linear_jax.layers.base import QKVMixer
from linear_jax.parallel.dispatch import recurrence


def retnet_decays(H: int) -> np.ndarray:
    return np.log1p(-(2.0 ** (-5.0 - np.arange(H))))


def lightning_decays(H: int, layer_idx: int, num_layers: int) -> np.ndarray:
    return -(8.0 * np.arange(H) / H) * (1.0 - layer_idx / max(num_layers, 1))


class Retention(QKVMixer):
    """Fixed-decay linear attention; `log_decay [H]` (<= 0) is a constant, not a parameter: a
    non-trainable `nnx.Variable`, so that layers whose decays differ (Lightning's depend on the
    layer) share one structure and stack into one scan in a model."""

    def __init__(self, d_model: int, num_heads: int, *, log_decay, expand_v: int = 1,
                 qk_activation=None, head_dim: int | None = None, **kw):
        K = head_dim or d_model // num_heads
        kw.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, key_dim=K, value_dim=expand_v * K, **kw)
        self.log_decay = nnx.Variable(jnp.asarray(np.asarray(log_decay, np.float32)))
        self.qk_activation = qk_activation

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        if self.qk_activation is not None:
            q, k = self.qk_activation(q), self.qk_activation(k)
        g = jnp.broadcast_to(self.log_decay[...].astype(jnp.float32), v.shape[:3])
        o, S = recurrence("simple_gla", q, k, v, g, initial_state=states["state"],
                          segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))
        return o, {"state": S}


class RetNet(Retention):
    def __init__(self, d_model: int, num_heads: int, *, expand_v: int = 2, **kw):
        super().__init__(d_model, num_heads, log_decay=retnet_decays(num_heads),
                         expand_v=expand_v, **kw)


class Lightning(Retention):
    def __init__(self, d_model: int, num_heads: int, *, layer_idx: int = 0, **kw):
        decays = lightning_decays(num_heads, layer_idx, kw.get("num_layers") or 1)
        super().__init__(d_model, num_heads, log_decay=decays, qk_activation=jax.nn.silu, **kw)

