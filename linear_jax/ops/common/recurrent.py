"""The step-by-step driver behind every `impl="recurrent"` reference.

An op supplies `step(state, x_t) -> (state, y_t)` written exactly as its recurrence reads; this
module moves time to the front, applies packed-document resets (the state is zeroed before a step
whose segment id differs from the previous one) and runs `lax.scan`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import resets


def state_or_zeros(initial_state, shape):
    """The initial state in float32, or zeros of `shape` when none is given."""
    if initial_state is None:
        return jnp.zeros(shape, jnp.float32)
    return jnp.asarray(initial_state).astype(jnp.float32)


def _zero_state(state):
    return jax.tree.map(jnp.zeros_like, state)


def scan_time(
    step: Callable,
    state0,
    xs,
    segment_ids=None,
    reset_state: Callable = _zero_state,
):
    """Runs `step` over axis 1 of every array in `xs` (a pytree of `[B, T, ...]`).

    `reset_state(state)` gives the state a new document starts from (zeros by default; ops whose
    state has a non-zero neutral element, such as a log-space stabiliser, pass their own).
    Returns `(ys, final_state)` with ys laid out `[B, T, ...]`.
    """
    xs_t = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs)
    if segment_ids is None:
        def body(S, x):
            return step(S, x)
        S, ys = lax.scan(body, state0, xs_t)
    else:
        r_t = jnp.moveaxis(resets(segment_ids), 1, 0)  # [T, B]

        def body(S, inp):
            r, x = inp
            fresh = reset_state(S)
            S = jax.tree.map(
                lambda s, z: jnp.where(r.reshape(r.shape + (1,) * (s.ndim - 1)), z, s), S, fresh
            )
            return step(S, x)
        S, ys = lax.scan(body, state0, (r_t, xs_t))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1), ys), S
