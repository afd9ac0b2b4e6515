"""Sequence-parallel Mamba-2 SSD: `linear_jax.ops.ssd` is `simple_gla` with q = C, k = B,
v = x * dt, g = dt * A and scale 1, plus the skip D x, so it runs on `parallel.simple_gla`. The
input maps are elementwise: with `mesh=` they run on the sharded global arrays before the
`shard_map`, without it on the local shards."""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops.common.gates import step_size
from linear_jax.ops.ssd import scaled_values
from linear_jax.parallel.decay import DEFAULT_MODE, simple_gla


def ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, *, axis_name="seq", mesh=None,
        batch_axes=None, head_axes=None, initial_state=None, segment_ids=None, chunk_size=64,
        impl="auto", config=None, mode=DEFAULT_MODE, staging="auto"):
    """Sequence-parallel `linear_jax.ops.ssd` (mesh arguments as `parallel.simple_gla`).
    Returns `(y [B,T,H,P], final_state [B,H,N,P] float32)`."""
    f32 = lambda a: a.astype(jnp.float32)
    dt = step_size(dt, dt_bias, dt_softplus)
    o, h = simple_gla(C, B, scaled_values(x, dt), dt * f32(A), axis_name=axis_name, mesh=mesh,
                      batch_axes=batch_axes, head_axes=head_axes, scale=1.0,
                      initial_state=initial_state, segment_ids=segment_ids,
                      chunk_size=chunk_size, impl=impl, config=config, mode=mode,
                      staging=staging)
    if D is not None:
        o = o + f32(D)[:, None] * f32(x)
    return o.astype(x.dtype), h
