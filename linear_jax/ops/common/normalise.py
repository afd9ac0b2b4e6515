"""mLSTM's output normalisation, shared by its XLA forms and its kernels (`linear_jax.ops.mlstm`
states the math): h = num / (max(|n . q|, exp(-m)) + eps)."""

from __future__ import annotations

import jax.numpy as jnp

# exp(80) ~ 5.5e34: the floor exp(-m) stays finite in float32 (`linear_jax.ops.mlstm` says why)
MAX_LOG_FLOOR = 80.0


def normalise(num, nq, m, eps):
    """h = num / (max(|nq|, exp(min(-m, 80))) + eps); num [..., V], nq and m [...]."""
    den = jnp.maximum(jnp.abs(nq), jnp.exp(jnp.minimum(-m, MAX_LOG_FLOOR))) + eps
    return num / den[..., None]
