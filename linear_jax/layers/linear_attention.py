"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention"): softmax replaced by the kernel phi(q)^T phi(k) with
phi = elu + 1, so causal attention is the recurrence S_t = S_{t-1} + phi(k_t) v_t^T.

    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t),    z_t = z_{t-1} + phi(k_t)    (normalize=True)

`normalize=False` drops the denominator and normalises the output per head instead (the stable
choice of later work, e.g. TransNormer). `feature_map="identity"` (with `normalize=False` and
`output_norm=False`) is the plain linear self-attention o_t = sum_{s <= t} (q_t . k_s) v_s of von
Oswald et al. 2023, whose one layer can carry out a step of gradient descent in context.
Defaults: key and value head dim d_model / num_heads, no output gate, no short conv, scale 1
with the normaliser (it cancels) and K^-1/2 without.
Based, ReBased and Hedgehog are this layer with another feature map (`features`, `feature_width`).
The op runs in the model's dtype (bfloat16 reaches the kernels' matrix units), except for a map
whose feature products can cancel to ~0 (`float32_op`, ReBased's): there rounding the numerator and
the normaliser to bfloat16 apart costs the gradients of q and k their accuracy, so the map and the
op run in float32 and the output goes back to the model's dtype.

Parameters: 4 D^2 (q, k, v, o with H K = H V = D) [+ V output norm when normalize=False].
State: [B, H, F, V] float32 (F the feature width), [B, H, F, V + 1] with the normaliser.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.layers.base import QKVMixer
from linear_jax.ops.feature_maps import elu_plus_one
from linear_jax.parallel.dispatch import recurrence


class LinearAttention(QKVMixer):
    float32_op = False

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None,
                 key_dim: int | None = None, normalize: bool = True,
                 feature_map: str = "elu_plus_one", **kw):
        if feature_map not in ("elu_plus_one", "identity"):
            raise ValueError(f"LinearAttention: feature_map must be 'elu_plus_one' or 'identity', "
                             f"got {feature_map!r}")
        head_dim = head_dim or d_model // num_heads
        kw.setdefault("output_norm", not normalize)
        super().__init__(d_model, num_heads, key_dim=key_dim or head_dim, value_dim=head_dim,
                         **kw)
        self.normalize = normalize
        self.identity = feature_map == "identity"

    def feature_width(self) -> int:
        return self.K

    def features(self, q, k):
        return (q, k) if self.identity else (elu_plus_one(q), elu_plus_one(k))

    def init_states(self, batch_size: int) -> dict:
        F, V = self.feature_width(), self.V + int(self.normalize)
        return {"state": jnp.zeros((batch_size, self.H, F, V), jnp.float32)}

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        dtype = v.dtype
        if self.float32_op:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        q, k = self.features(q, k)
        o, S = recurrence("linear_attention", q, k, v, normalize=self.normalize,
                          scale=1.0 if self.normalize else None, initial_state=states["state"],
                          segment_ids=segment_ids, seq_parallel=seq_parallel,
                          **dict(self.op_kw))
        return o.astype(dtype), {"state": S}
