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
`prefix=P` makes the first P positions attend to each other both ways (a prefix LM), the rest
causally to everything before them and themselves: o_t = sum_{s < P} (q_t . k_s) v_s for t < P,
the recurrence from the prefix's state after it. Von Oswald et al.'s layers are so (every token
sees every example: their N examples are the prefix), and from two layers on it matters: a
causal example cannot hold the full-context residual a second GD step needs. Full sequences only
(no cache, segments or sequence parallelism), without the normaliser, one key head per head.
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
                 feature_map: str = "elu_plus_one", prefix: int = 0, **kw):
        if feature_map not in ("elu_plus_one", "identity"):
            raise ValueError(f"LinearAttention: feature_map must be 'elu_plus_one' or 'identity', "
                             f"got {feature_map!r}")
        if prefix < 0 or (prefix and (normalize or (kw.get("num_kv_heads") or num_heads)
                                      != num_heads)):
            raise ValueError(f"LinearAttention: prefix={prefix} must be >= 0, and a prefix needs "
                             f"normalize=False and num_kv_heads == num_heads (got normalize="
                             f"{normalize}, num_kv_heads={kw.get('num_kv_heads')})")
        head_dim = head_dim or d_model // num_heads
        kw.setdefault("output_norm", not normalize)
        super().__init__(d_model, num_heads, key_dim=key_dim or head_dim, value_dim=head_dim,
                         **kw)
        self.normalize = normalize
        self.identity = feature_map == "identity"
        self.prefix = prefix

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        if self.prefix and (cache is not None or segment_ids is not None
                            or seq_parallel is not None or x.shape[1] < self.prefix):
            raise ValueError(f"LinearAttention(prefix={self.prefix}) runs on whole sequences of "
                             f"at least {self.prefix} tokens without a cache, segment_ids or "
                             f"sequence parallelism; got x {x.shape}, cache "
                             f"{cache is not None}, segment_ids {segment_ids is not None}, "
                             f"seq_parallel {seq_parallel is not None}")
        return super().__call__(x, segment_ids=segment_ids, cache=cache,
                                seq_parallel=seq_parallel)

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
        if self.prefix:
            return self._mix_prefix(q, k, v, states["state"], dtype)
        o, S = recurrence("linear_attention", q, k, v, normalize=self.normalize,
                          scale=1.0 if self.normalize else None, initial_state=states["state"],
                          segment_ids=segment_ids, seq_parallel=seq_parallel,
                          **dict(self.op_kw))
        return o.astype(dtype), {"state": S}

    def _mix_prefix(self, q, k, v, S0, dtype):
        """The prefix's final state (S0 + its k v^T, one product) read by every prefix query,
        then the recurrence after it."""
        P, scale = self.prefix, q.shape[-1] ** -0.5
        S = S0 + jnp.einsum("bshk,bshv->bhkv", k[:, :P], v[:, :P],
                            preferred_element_type=jnp.float32)
        o = jnp.einsum("bthk,bhkv->bthv", q[:, :P].astype(jnp.float32) * scale, S)
        if q.shape[1] > P:
            rest, S = recurrence("linear_attention", q[:, P:], k[:, P:], v[:, P:],
                                 normalize=False, scale=scale, initial_state=S,
                                 **dict(self.op_kw))
            o = jnp.concatenate([o, rest.astype(jnp.float32)], axis=1)
        return o.astype(dtype), {"state": S}
