"""Gated DeltaProduct (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs
via Householder Products").

Each token writes n keys and values, so its state transition is a product of n generalised
Householder matrices:

    S_t = exp(g_t) S_{t-1};   S_t <- (I - beta_ti k_ti k_ti^T) S_t + beta_ti k_ti v_ti^T, i = 1..n
    o_t = S_t^T q_t / sqrt(K),      y = (RMSNorm_V(o) * swish(x W_g)) W_o

q, k, v through short convs with silu, l2-normalised q, k, beta_ti = 2 sigmoid (eigenvalues down to
-1, as the paper uses for state tracking), the Mamba-2 decay of Gated DeltaNet (`gated=False`
drops it: plain DeltaProduct). Op: `linear_jax.ops.delta_product`.

Parameters: D (H K + n H K + n H V) + n D H + H V D [+ D H + 2 H gate] [+ H V D output gate] + V
+ 4 (H K + n H K + n H V) conv.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.layers.common import DecayGate
from linear_jax.layers.deltanet import DeltaNet
from linear_jax.ops.delta_product import delta_product


class DeltaProduct(DeltaNet):
    SEQ_PARALLEL = False     # no sequence-parallel delta_product op yet

    def __init__(self, d_model: int, num_heads: int, *, num_householder: int = 2,
                 gated: bool = True, allow_neg_eigval: bool = True, rngs, dtype=None,
                 param_dtype=jnp.float32, **kw):
        kw.setdefault("output_gate", True)
        super().__init__(d_model, num_heads, steps=num_householder,
                         allow_neg_eigval=allow_neg_eigval, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, **kw)
        self.decay = (DecayGate(d_model, num_heads, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype, std=self.std) if gated else None)

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        q, k, beta = self.qkb(x, q, k)
        split = lambda a: a.reshape(a.shape[:2] + (self.steps, -1) + a.shape[3:])
        g = None if self.decay is None else self.decay(x)
        o, S = delta_product(q, split(k), split(v), split(beta), g,
                             initial_state=states["state"], segment_ids=segment_ids,
                             **dict(self.op_kw))
        return o, {"state": S}
