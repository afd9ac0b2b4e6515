"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): linear attention with the 2nd-order Taylor feature map of exp on small (16-dim)
query/key projections, with the normaliser.

    phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)]
    phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)

The Based architecture interleaves these layers with small sliding-window softmax attention
(window 64) layers: `LMConfig(layers=("based", "attention", ...),
mixer_options={"attention": {"window": 64}})`. Op: `linear_attention` over
`feature_maps.taylor_features`.

Parameters: D (2 H d + D) + D^2, d = feature_dim. State: [B, H, 1 + d + d^2, D/H + 1] float32.
"""

from __future__ import annotations

from linear_jax.layers.linear_attention import LinearAttention
from linear_jax.ops.feature_maps import taylor_features


class Based(LinearAttention):
    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16, **kw):
        super().__init__(d_model, num_heads, key_dim=feature_dim, normalize=True, **kw)

    def feature_width(self) -> int:
        return 1 + self.K + self.K ** 2

    def features(self, q, k):
        return taylor_features(q), taylor_features(k)
