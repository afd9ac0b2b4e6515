"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): linear attention with the 2nd-order Taylor feature map of exp on small (16-dim)
query/key projections, with the normaliser.

    phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)]
    phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)

The Based architecture interleaves these layers with small sliding-window softmax attention
(window 64) layers: `LMConfig(layers=("based", "attention", ...),
mixer_options={"attention": {"window": 64}})`. Op: `linear_attention` over
`feature_maps.taylor_features`.

`compact=True` keeps each product x_i x_j of the quadratic block once (i <= j, the off-diagonal
ones weighted by sqrt(2)): the same phi(q) . phi(k), so the same function up to rounding, in
1 + d + d (d + 1) / 2 features instead of 1 + d + d^2 (153 instead of 273 at d = 16). The state
shrinks by the same factor, and at d = 16 it fits the GPU kernels' key width of 256, which the
full map's 273 does not ("auto" then runs the kernels, not the chunk form).

Parameters: D (2 H d + D) + D^2, d = feature_dim. State: [B, H, F, D/H + 1] float32, F the
feature width above.
"""

from __future__ import annotations

from linear_jax.layers.linear_attention import LinearAttention
from linear_jax.ops.feature_maps import taylor_features


class Based(LinearAttention):
    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16,
                 compact: bool = False, **kw):
        super().__init__(d_model, num_heads, key_dim=feature_dim, normalize=True, **kw)
        self.compact = compact

    def feature_width(self) -> int:
        d = self.K
        return 1 + d + (d * (d + 1) // 2 if self.compact else d * d)

    def features(self, q, k):
        return taylor_features(q, compact=self.compact), taylor_features(k, compact=self.compact)
