"""Sums of log-decays over spans, formed so that gradients stay exact at strong decay.

The decay between steps j < i is exp(sum_{j<s<=i} g_s). Writing that sum as a difference of two
cumulative sums (G_i - G_j) is exact in the forward pass but not in the backward: the gradient of a
pair reaches every g_s twice, once with each sign, and the two O(1) contributions of pairs with no
decay (i = j) cancel only to rounding. When the true d(g) is tiny (g = -20 makes it ~1e-9) that
rounding is all that is left (the silent d(gate) corruption users report for other libraries).
The helpers below form each span sum from exactly the g_s inside the span (Mamba-2's "segsum"),
so a pair's gradient reaches only the gates between its two ends and nothing cancels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import resets


def cumsum_incl(g, axis: int):
    """sum_{s <= i} g_s along `axis`."""
    return jnp.cumsum(g, axis=axis)


def rev_cumsum_excl(g, axis: int):
    """sum_{s > i} g_s along `axis` (a shift, then a reverse cumulative sum: no subtraction)."""
    g = jnp.moveaxis(g, axis, -1)
    shifted = jnp.concatenate([g[..., 1:], jnp.zeros_like(g[..., :1])], axis=-1)
    out = jnp.flip(jnp.cumsum(jnp.flip(shifted, -1), axis=-1), -1)
    return jnp.moveaxis(out, -1, axis)


def segsum(g):
    """D[..., i, j] = sum_{j < s <= i} g[..., s] for i >= j, and -inf above the diagonal.

    g [..., C] -> [..., C, C], over the last axis.
    """
    C = g.shape[-1]
    s = jnp.arange(C)
    x = jnp.where(s[:, None] > s[None, :], g[..., :, None], 0.0)  # x[s, j] = g_s for s > j
    d = jnp.cumsum(x, axis=-2)                                       # d[i, j] = sum_{j<s<=i} g_s
    return jnp.where(s[:, None] >= s[None, :], d, -jnp.inf)


def step_size(dt, bias=None, softplus: bool = False):
    """Mamba's step size in float32: softplus(dt + bias), or dt + bias without `softplus`."""
    dt = dt.astype(jnp.float32)
    if bias is not None:
        dt = dt + bias.astype(jnp.float32)
    return jax.nn.softplus(dt) if softplus else dt


def running_max(i, l, m0, segment_ids):
    """mLSTM's stabiliser m_t = max(l_t + m_{t-1}, i_t), m_{-1} = m0 [B, H], restarting from 0 at
    a reset; i, l [B, T, H] float32 -> [B, T, H].

    Step t is the map x -> max(x + a_t, b_t) and maps compose as (a1, b1) then (a2, b2) =
    (a1 + a2, max(b1 + a2, b2)), so a prefix scan of the pairs gives every m_t. A reset forgets x:
    a = -inf, b = max(l_t, i_t) (the zero state's candidate 0 + l_t)."""
    a, b = l, i
    if segment_ids is not None:
        r = resets(segment_ids)[..., None]
        a, b = jnp.where(r, -jnp.inf, l), jnp.where(r, jnp.maximum(l, i), i)
    combine = lambda x, y: (x[0] + y[0], jnp.maximum(x[1] + y[0], y[1]))   # noqa: E731
    A, Bm = lax.associative_scan(combine, (a, b), axis=1)
    return jnp.maximum(m0[:, None, :] + A, Bm)
