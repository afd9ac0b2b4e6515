"""Grouped heads: q and k may have fewer heads than v (GQA/GVA); each group serves H // Hk heads."""

from __future__ import annotations

import jax.numpy as jnp


def repeat_heads(x, H: int, axis: int = 2):
    """Repeats the head axis of `x` up to H heads (a no-op when it already has H)."""
    h = x.shape[axis]
    return x if h == H else jnp.repeat(x, H // h, axis=axis)


def default_scale(scale, K: int) -> float:
    return K ** -0.5 if scale is None else scale
