"""ReBased (Aksenov et al. 2024, "Linear Transformers with Learnable Kernel Functions are Better
In-Context Models"): Based with a learnable quadratic kernel and no constant or linear term.

    z = gamma * LayerNorm(x) + beta,    phi(x) = vec(z z^T),    phi(q) . phi(k) = (z_q . z_k)^2

gamma, beta [d] are learned (shared by q, k and the heads), on 16-dim query/key projections, with
the normaliser. Op: `linear_attention` over `feature_maps.rebased_features`.

`compact=True` keeps each product z_i z_j once (i <= j, off-diagonal ones weighted by sqrt(2)):
the same kernel (z_q . z_k)^2 in d (d + 1) / 2 features instead of d^2 (136 instead of 256 at d =
16), and a state smaller by that factor.

The op runs in float32 whatever the model's dtype (`LinearAttention.float32_op`): the signed
features' products cancel where z_q . z_k ~ 0, and in bfloat16 the gradients of q and k there
lost their accuracy (6.6e-2 against float64 on the draw of
`tests/ops/test_decay_family.py::test_normaliser_shares_the_numerators_products`, 1.6e-3 in
float32).

Parameters: D (2 H d + D) + D^2 + 2 d. State: [B, H, F, D/H + 1] float32, F = d^2 (compact:
d (d + 1) / 2).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import param
from linear_jax.layers.linear_attention import LinearAttention
from linear_jax.ops.feature_maps import rebased_features


class ReBased(LinearAttention):
    float32_op = True

    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16,
                 compact: bool = False, rngs, param_dtype=jnp.float32, **kw):
        super().__init__(d_model, num_heads, key_dim=feature_dim, normalize=True, rngs=rngs,
                         param_dtype=param_dtype, **kw)
        self.gamma = param(rngs, nnx.initializers.ones, (feature_dim,), ("kv",), param_dtype)
        self.beta = param(rngs, nnx.initializers.zeros, (feature_dim,), ("kv",), param_dtype)
        self.compact = compact

    def feature_width(self) -> int:
        return self.K * (self.K + 1) // 2 if self.compact else self.K ** 2

    def features(self, q, k):
        phi = lambda x: rebased_features(x, self.gamma[...], self.beta[...], compact=self.compact)
        return phi(q), phi(k)
