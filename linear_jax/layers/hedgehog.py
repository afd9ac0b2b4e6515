"""Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry"): linear attention whose feature map is learned, one per head for queries and one
for keys,

    phi(x) = softmax([x W + b, -(x W + b)])       W [H, K, K] initialised to the identity

with the normaliser (the paper trains the maps to mimic softmax attention weights; here they are
trained with the model). Op: `linear_attention` over `feature_maps.hedgehog_features`.

Parameters: 4 D^2 + 2 H (K^2 + K). State: [B, H, 2 K, K + 1] float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import param
from linear_jax.layers.linear_attention import LinearAttention
from linear_jax.ops.feature_maps import hedgehog_features


class Hedgehog(LinearAttention):
    def __init__(self, d_model: int, num_heads: int, *, rngs, param_dtype=jnp.float32, **kw):
        super().__init__(d_model, num_heads, normalize=True, rngs=rngs, param_dtype=param_dtype,
                         **kw)
        H, K = self.H, self.K
        eye = lambda key, shape, dt: jnp.broadcast_to(jnp.eye(shape[-1], dtype=dt), shape)
        mk_w = lambda: param(rngs, eye, (H, K, K), ("heads", "kv", None), param_dtype)
        mk_b = lambda: param(rngs, nnx.initializers.zeros, (H, K), ("heads", None), param_dtype)
        self.wq, self.bq, self.wk, self.bk = mk_w(), mk_b(), mk_w(), mk_b()

    def feature_width(self) -> int:
        return 2 * self.K

    def features(self, q, k):
        return (hedgehog_features(q, self.wq[...], self.bq[...]),
                hedgehog_features(k, self.wk[...], self.bk[...]))
