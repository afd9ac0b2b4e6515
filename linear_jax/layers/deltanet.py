"""DeltaNet and EFLA: linear attention whose state is edited by the delta rule.

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v));  q, k l2-normalised
    beta_t = sigmoid(x W_b)               (2 sigmoid with `allow_neg_eigval`: beta in [0, 2])
    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t / sqrt(K)
    y = RMSNorm_V(o) W_o          (optionally * swish(x W_g), `output_gate=True`)

DeltaNet: Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers"; the
layer of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length" (short convs of width 4, silu, l2 norm on q and k, sigmoid beta, per-head output norm).
Negative eigenvalues: Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues".

EFLA ("Error-Free Linear Attention"): the same layer integrating the delta flow exactly over each
step, i.e. `delta_rule(exact=True)`, which replaces beta by (1 - exp(-beta ||k||^2)) / ||k||^2.

Op: `linear_jax.ops.delta_rule`. Parameters: D (2 H K + H V) + D H + H V D + V
+ 4 (2 H K + H V) (conv) [+ H V D gate]; with H K = H V = D: 4 D^2 + D H + 12 D + D/H.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from linear_jax.layers.base import QKVMixer
from linear_jax.layers.common import dense
from linear_jax.ops.norms import l2norm
from linear_jax.parallel.dispatch import recurrence


class DeltaNet(QKVMixer):
    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None,
                 expand_v: float = 1.0, allow_neg_eigval: bool = False, exact: bool = False,
                 conv_size: int = 4, rngs, dtype=None, param_dtype=jnp.float32, **kw):
        K = head_dim or d_model // num_heads
        super().__init__(d_model, num_heads, key_dim=K, value_dim=int(K * expand_v),
                         conv_size=conv_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         **kw)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.b_proj = mk(d_model, self.steps * num_heads, ("embed", "heads"), std=self.std)
        self.beta_max = 2.0 if allow_neg_eigval else 1.0
        self.exact = exact

    def qkb(self, x, q, k):
        """l2-normalised q, k and beta [B, T, n * H] in [0, beta_max]."""
        if self.conv is None:                        # the conv path applies silu already
            q, k = jax.nn.silu(q), jax.nn.silu(k)
        beta = self.beta_max * jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        # recomputed in the backward, which then keeps q, k in their dtype, not float32 copies
        norm = jax.checkpoint(l2norm)
        return norm(q), norm(k), beta

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        q, k, beta = self.qkb(x, q, k)
        o, S = recurrence("delta_rule", q, k, v, beta, exact=self.exact,
                          initial_state=states["state"], segment_ids=segment_ids,
                          seq_parallel=seq_parallel, **dict(self.op_kw))
        return o, {"state": S}


class EFLA(DeltaNet):
    def __init__(self, d_model: int, num_heads: int, **kw):
        super().__init__(d_model, num_heads, exact=True, **kw)
