"""Normalisations around linear-attention layers, as pure functions over the last axis.

- `l2norm`: q/k normalisation of the delta-rule family (Yang et al. 2024, "Parallelizing Linear
  Transformers with the Delta Rule over Sequence Length"), x / sqrt(sum x^2 + eps): unlike
  x / ||x||, its gradient at x = 0 is finite (I / sqrt(eps)).
- `rms_norm` (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization") and `layer_norm`.
- Output norms of multi-head layers. On [..., H, D] outputs `rms_norm` normalises every head on its
  own; its weight may be [D] (shared, as GLA's output norm) or [H, D] (per head). On flattened
  [..., H * D] outputs `group_rms_norm` / `group_norm` do the same with `num_groups = H` (RetNet's
  GroupNorm over heads, Sun et al. 2023).
- `gated_rms_norm`: rms_norm(x) * silu(gate) (GLA, Gated DeltaNet, Mamba-2 with
  `norm_before_gate=False`: rms_norm(x * silu(gate)), grouped over `num_groups` as Mamba-2's
  RMSNormGated). It is one expression: XLA fuses it into a single pass, so there is no separate
  fused kernel.

Everything computes in float32 and returns x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = lambda x: jnp.asarray(x).astype(jnp.float32)


def _affine(y, weight, bias):
    if weight is not None:
        y = y * f32(weight)
    if bias is not None:
        y = y + f32(bias)
    return y


def l2norm(x, axis=-1, eps=1e-6):
    """x / sqrt(sum(x^2, axis) + eps)."""
    xf = f32(x)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=axis, keepdims=True) + eps)).astype(x.dtype)


def rms_norm(x, weight=None, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; `weight` broadcasts from the right."""
    xf = f32(x)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return _affine(y, weight, None).astype(x.dtype)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis."""
    xf = f32(x)
    xc = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return _affine(y, weight, bias).astype(x.dtype)


def _grouped(x, num_groups):
    D = x.shape[-1]
    if D % num_groups:
        raise ValueError(f"the last axis of x{tuple(x.shape)} ({D}) must be a multiple of "
                         f"num_groups={num_groups}")
    return f32(x).reshape(*x.shape[:-1], num_groups, D // num_groups)


def group_rms_norm(x, num_groups, weight=None, eps=1e-6):
    """`rms_norm` of each of `num_groups` equal slices of the last axis; `weight` is [D]."""
    y = rms_norm(_grouped(x, num_groups), None, eps).reshape(x.shape)
    return _affine(y, weight, None).astype(x.dtype)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """GroupNorm over the last axis: `layer_norm` of each of `num_groups` slices, then the [D]
    affine (torch.nn.GroupNorm's statistics, channels last)."""
    y = layer_norm(_grouped(x, num_groups), None, None, eps).reshape(x.shape)
    return _affine(y, weight, bias).astype(x.dtype)


def gated_rms_norm(x, gate, weight=None, eps=1e-6, *, num_groups=1, norm_before_gate=True):
    """rms_norm(x) * weight * silu(gate), or rms_norm(x * silu(gate)) * weight when
    `norm_before_gate=False`; the statistics are taken over `num_groups` slices of the last axis."""
    if jnp.shape(gate) != jnp.shape(x):
        raise ValueError(f"gate must have the shape of x {tuple(jnp.shape(x))}, got "
                         f"{tuple(jnp.shape(gate))}")
    silu = jax.nn.silu(f32(gate))
    if norm_before_gate:
        y = group_rms_norm(f32(x), num_groups, weight, eps) * silu
    else:
        y = group_rms_norm(f32(x) * silu, num_groups, weight, eps)
    return y.astype(x.dtype)
