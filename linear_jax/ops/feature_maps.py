"""Feature maps phi for linear attention: softmax(q k^T) is replaced by phi(q) phi(k)^T.

Every map acts on the last axis of x [..., D] (so on [B, T, H, D] queries and keys), is a pure
function (learned parameters and random projections are arguments), computes in float32 and returns
x's dtype. Apply the same map to q and k and pass the features to `linear_attention`, `simple_gla`
and friends.

- `elu_plus_one`: elu(x) + 1 (Katharopoulos et al. 2020, "Transformers are RNNs").
- `relu_features`: max(x, 0) (cosFormer's base map, Qin et al. 2022).
- `taylor_features`: Based's 2nd-order Taylor map (Arora et al. 2024, "Simple linear attention
  language models balance the recall-throughput tradeoff"):
  phi(x) = [1, x / D^(1/4), vec(x x^T) / sqrt(2 D)], so phi(q) . phi(k) = 1 + q.k / sqrt(D) +
  (q.k)^2 / (2 D), the 2nd-order Taylor expansion of exp(q.k / sqrt(D)).
- `rebased_features`: ReBased (Aksenov et al. 2024, "Linear Transformers with Learnable Kernel
  Functions are Better In-Context Models"): z = gamma * layernorm(x) + beta, phi(x) = vec(z z^T),
  so phi(q) . phi(k) = (z_q . z_k)^2.
- `hedgehog_features`: Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine"):
  softmax([x W, -x W]) over the 2F features.
- `cosformer_features`: cosFormer (Qin et al. 2022): relu(x_t) re-weighted by cos and sin of
  pi t / (2 M), so phi(q_i) . phi(k_j) = relu(q_i) . relu(k_j) cos(pi (i - j) / (2 M)).
- `performer_features`: FAVOR+ positive random features (Choromanski et al. 2021, "Rethinking
  Attention with Performers"): phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) with E[phi(q) . phi(k)] =
  exp(q . k) for rows of W ~ N(0, I).
- `rfa_features`: random Fourier features (Peng et al. 2021, "Random Feature Attention"):
  phi(x) = [sin(W x), cos(W x)] / sqrt(m) with E[phi(x) . phi(y)] = exp(-|x - y|^2 / 2).
- `orthogonal_random_projection`: W for the two above with orthogonal blocks of rows (Performer's
  ORF: unbiased, lower variance).

The quadratic maps take `compact=True` to keep only the D (D + 1) / 2 distinct products x_a x_b
(a <= b), the off-diagonal ones weighted by sqrt(2): the same inner products in half the width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from linear_jax.ops.norms import layer_norm

f32 = lambda x: jnp.asarray(x).astype(jnp.float32)


def elu_plus_one(x):
    """x + 1 for x > 0, exp(x) otherwise (not expm1(x) + 1, which cancels for x << 0)."""
    xf = f32(x)
    return jnp.where(xf > 0, xf + 1.0, jnp.exp(jnp.minimum(xf, 0.0))).astype(x.dtype)


def relu_features(x):
    return jax.nn.relu(x)


def _outer(z, compact: bool):
    """vec(z z^T) [..., D * D], or its D (D + 1) / 2 distinct entries, weighted so that inner
    products are kept."""
    D = z.shape[-1]
    if not compact:
        return (z[..., :, None] * z[..., None, :]).reshape(*z.shape[:-1], D * D)
    # row i of the upper triangle, (i, i) then (i, j > i) weighted by sqrt(2): slices, where
    # index arrays (z[..., a] * z[..., b]) differentiate into scatter-adds
    w = lambda n: jnp.asarray([1.0] + [math.sqrt(2.0)] * (n - 1), z.dtype)
    return jnp.concatenate([z[..., i:i + 1] * z[..., i:] * w(D - i) for i in range(D)], axis=-1)


def taylor_features(x, *, compact=False):
    """Based: [1, x / D^(1/4), vec(x x^T) / (sqrt(2) sqrt(D))], width 1 + D + D^2 (compact:
    1 + D + D (D + 1) / 2)."""
    xf = f32(x)
    D = xf.shape[-1]
    ones = jnp.ones(xf.shape[:-1] + (1,), jnp.float32)
    quad = _outer(xf, compact) / (math.sqrt(2.0) * math.sqrt(D))
    return jnp.concatenate([ones, xf / D**0.25, quad], axis=-1).astype(x.dtype)


def rebased_features(x, gamma=None, beta=None, *, eps=1e-5, compact=False):
    """ReBased: vec(z z^T) with z = gamma * layernorm(x) + beta (gamma, beta [D] learned)."""
    z = layer_norm(f32(x), gamma, beta, eps)
    return _outer(z, compact).astype(x.dtype)


def hedgehog_features(x, weight, bias=None):
    """Hedgehog: softmax([x W + b, -(x W + b)]) over the last axis.

    `weight` is [D, F] (shared) or [H, D, F] (per head, with x [..., H, D]); `bias` [F] or [H, F].
    Returns [..., 2F].
    """
    xf = f32(x)
    if jnp.ndim(weight) == 3:
        z = jnp.einsum("...hd,hdf->...hf", xf, f32(weight), precision="highest")
    else:
        z = jnp.einsum("...d,df->...f", xf, f32(weight), precision="highest")
    if bias is not None:
        z = z + f32(bias)
    return jax.nn.softmax(jnp.concatenate([z, -z], axis=-1), axis=-1).astype(x.dtype)


def cosformer_features(x, positions=None, max_len=None):
    """cosFormer: [relu(x) cos(pi t / (2M)), relu(x) sin(pi t / (2M))], width 2D.

    x [B, T, ...]; `positions` [T] or [B, T] (default 0..T-1: pass the absolute positions when
    decoding in pieces); `max_len` M (default T) must exceed every position, so that the
    re-weighting cos(pi (i - j) / (2M)) decays with distance and stays positive.
    """
    xf = jax.nn.relu(f32(x))
    T = xf.shape[1]
    t = jnp.arange(T) if positions is None else jnp.asarray(positions)
    t = jnp.broadcast_to(t, xf.shape[:2]).astype(jnp.float32)
    angle = (math.pi / (2.0 * (T if max_len is None else max_len)) * t).reshape(
        xf.shape[:2] + (1,) * (xf.ndim - 2))
    return jnp.concatenate([xf * jnp.cos(angle), xf * jnp.sin(angle)], axis=-1).astype(x.dtype)


def _project(x, projection, scale):
    """(x * scale) W^T with W [m, D]."""
    return jnp.einsum("...d,md->...m", f32(x) * scale, f32(projection), precision="highest")


def performer_features(x, projection, *, scale=None, stabilize_axes=None):
    """FAVOR+: exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = scale * x and W = `projection` [m, D].

    scale defaults to D^(-1/4), so phi(q) . phi(k) estimates the softmax kernel exp(q.k / sqrt(D)).
    `stabilize_axes`: subtract the maximum exponent over these axes (constant for the gradient),
    as Performer does (queries: -1; keys: every axis but the batch and heads). That rescales each
    query's kernel row by one positive constant, which cancels in normalised attention, and keeps
    exp from overflowing; with None the estimator is the unbiased one above.
    """
    D = x.shape[-1]
    s = D**-0.25 if scale is None else scale
    u = _project(x, projection, s) - 0.5 * jnp.sum((f32(x) * s) ** 2, axis=-1, keepdims=True)
    if stabilize_axes is not None:
        u = u - jax.lax.stop_gradient(jnp.max(u, axis=stabilize_axes, keepdims=True))
    return (jnp.exp(u) / math.sqrt(projection.shape[0])).astype(x.dtype)


def rfa_features(x, projection, *, scale=1.0):
    """RFA: [sin(W x'), cos(W x')] / sqrt(m), x' = scale * x, W = `projection` [m, D]; width 2m.

    E[phi(x) . phi(y)] = exp(-scale^2 |x - y|^2 / 2), which for unit-norm x, y (RFA normalises q
    and k) is exp(scale^2 (x . y - 1)), a softmax kernel with temperature 1 / scale^2.
    """
    u = _project(x, projection, scale)
    m = projection.shape[0]
    return (jnp.concatenate([jnp.sin(u), jnp.cos(u)], axis=-1) / math.sqrt(m)).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(1, 2), static_argnames=("scaling",))
def orthogonal_random_projection(key, num_features, dim, *, scaling="norm"):
    """W [num_features, dim] whose rows come in blocks of `dim` mutually orthogonal rows (QR of a
    Gaussian block). scaling="norm": each row takes the norm of an independent N(0, I_dim) draw,
    so every row is marginally N(0, I_dim) (unbiased features); "sqrt_dim": every row has norm
    sqrt(dim) (Performer's regularised variant)."""
    if scaling not in ("norm", "sqrt_dim"):
        raise ValueError(f"scaling must be 'norm' or 'sqrt_dim', got {scaling!r}")
    n_blocks = -(-num_features // dim)
    k_blocks, k_norms = jax.random.split(key)
    g = jax.random.normal(k_blocks, (n_blocks, dim, dim), jnp.float32)
    q, r = jnp.linalg.qr(g)
    # fix the signs so Q is Haar-distributed (QR alone biases them)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(n_blocks * dim, dim)[:num_features]
    if scaling == "norm":
        norms = jnp.linalg.norm(jax.random.normal(k_norms, (num_features, dim)), axis=-1)
    else:
        norms = jnp.full((num_features,), math.sqrt(dim))
    return rows * norms[:, None]
