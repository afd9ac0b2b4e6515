"""Log-linear Mamba-2 and log-linear Gated DeltaNet (Guo et al. 2025, "Log-Linear Attention").

Each is its base layer with the one-state scan replaced by the Fenwick level states of
`linear_jax.ops.log_linear_simple_gla` / `log_linear_gated_delta_rule`, read through per-level
weights from the token:

    lambda_t = softplus(x_t W_l + b_l)        [H, L], b_l at softplus^-1(1): at init every level
                                              weighs 1 and the layer computes its base layer

`num_levels` L (default 12) keeps exact Fenwick buckets up to 2^(L-1) = 2048 tokens; older keys
pool in the top level. Parameters: the base layer's + D H L + H L. State: `FenwickState(levels
[B, H, L, K, V], position [B])` float32 (K, V = N, P for Mamba-2), O(L) times the base layer's.
Both run sequence-parallel (`linear_jax.parallel.log_linear`; docs/sequence_parallel.md,
"Log-linear attention").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax import ops
from linear_jax.layers.common import dense, inv_softplus, param
from linear_jax.layers.gated_deltanet import GatedDeltaNet
from linear_jax.layers.mamba2 import Mamba2
from linear_jax.ops.common.fenwick import FenwickState
from linear_jax.ops.common.gates import step_size
from linear_jax.parallel import dispatch


class LevelWeights(nnx.Module):
    """lambda = softplus(x W + b) [B, T, H, L] float32, 1 at init's bias."""

    def __init__(self, d_model, num_heads, num_levels, *, rngs, dtype, param_dtype, std):
        self.shape = (num_heads, num_levels)
        self.proj = dense(d_model, num_heads * num_levels, ("embed", "heads"), rngs=rngs,
                          dtype=dtype, param_dtype=param_dtype, std=std)
        self.bias = param(rngs, lambda k, s, d: jnp.full(s, inv_softplus(1.0), d),
                          (num_heads * num_levels,), ("heads",), param_dtype)

    def __call__(self, x):
        a = self.proj(x).astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return jax.nn.softplus(a).reshape(x.shape[:2] + self.shape)


def fenwick_zeros(batch_size, H, L, K, V):
    return FenwickState(jnp.zeros((batch_size, H, L, K, V), jnp.float32),
                        jnp.zeros((batch_size,), jnp.float32))


class LogLinearMamba2(Mamba2):
    def __init__(self, d_model: int, num_heads: int, *, num_levels: int = 12, rngs,
                 dtype=None, param_dtype=jnp.float32, **kw):
        super().__init__(d_model, num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         **kw)
        self.L = num_levels
        self.levels = LevelWeights(d_model, num_heads, num_levels, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype, std=kw.get("std", 0.02))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        cache = super().init_cache(batch_size, dtype)
        return {**cache, "state": fenwick_zeros(batch_size, self.H, self.L, self.N, self.P)}

    def ssm(self, x, xs, dt, Bm, Cm, state, segment_ids, seq_parallel):
        # Mamba-2's SSD as simple GLA (see linear_jax.ops.ssd): q = C, k = B, v = dt x, g = dt A
        dt = step_size(dt, self.dt_bias[...], softplus=True)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y, S = dispatch.recurrence(
            "log_linear_simple_gla", Cm, Bm, xs.astype(jnp.float32) * dt[..., None], dt * A,
            self.levels(x), scale=1.0, initial_state=state, segment_ids=segment_ids,
            seq_parallel=seq_parallel, **dict(self.op_kw))
        y = y + self.D[...].astype(jnp.float32)[:, None] * xs.astype(jnp.float32)
        return y.astype(xs.dtype), S


class LogLinearGatedDeltaNet(GatedDeltaNet):
    def __init__(self, d_model: int, num_heads: int, *, num_levels: int = 12, rngs,
                 dtype=None, param_dtype=jnp.float32, **kw):
        super().__init__(d_model, num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         **kw)
        self.L = num_levels
        self.levels = LevelWeights(d_model, num_heads, num_levels, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype, std=self.std)

    def init_states(self, batch_size: int) -> dict:
        return {"state": fenwick_zeros(batch_size, self.H, self.L, self.K, self.V)}

    def mix(self, x, q, k, v, states, segment_ids, seq_parallel=None):
        q, k, beta = self.qkb(x, q, k)
        if self.exact:
            beta = ops.efla_beta(k, beta)
        o, S = dispatch.recurrence(
            "log_linear_gated_delta_rule", q, k, v, self.decay(x), beta, self.levels(x),
            initial_state=states["state"], segment_ids=segment_ids, seq_parallel=seq_parallel,
            **dict(self.op_kw))
        return o, {"state": S}
