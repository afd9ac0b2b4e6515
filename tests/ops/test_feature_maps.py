"""Feature maps: the kernel identities each paper states, shapes and dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.ops import feature_maps as fm

D = 6


def _x(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _dot(a, b):
    return np.einsum("...f,...f->...", np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_elu_plus_one_is_positive_and_exact():
    x = _x(0, 3, D) * 3
    np.testing.assert_allclose(fm.elu_plus_one(x), np.where(x > 0, x + 1, np.exp(x)), rtol=1e-6)
    assert (np.asarray(fm.elu_plus_one(-3 * np.abs(x))) > 0).all()
    grad = jax.grad(lambda v: fm.elu_plus_one(v).sum())(jnp.array([-100.0, 100.0]))
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(fm.relu_features(x), np.maximum(x, 0))


@pytest.mark.parametrize("compact", [False, True])
def test_taylor_map_inner_product_is_the_second_order_expansion(compact):
    q, k = _x(1, 4, D), _x(2, 4, D)
    pq, pk = fm.taylor_features(q, compact=compact), fm.taylor_features(k, compact=compact)
    assert pq.shape == (4, 1 + D + (D * (D + 1) // 2 if compact else D * D))
    s = _dot(q, k)
    np.testing.assert_allclose(_dot(pq, pk), 1 + s / np.sqrt(D) + s**2 / (2 * D), rtol=1e-5)


@pytest.mark.parametrize("compact", [False, True])
def test_rebased_map_is_the_square_of_the_normalised_affine_dot(compact):
    q, k = _x(3, 4, D), _x(4, 4, D)
    gamma, beta = 1 + 0.3 * _x(5, D), 0.2 * _x(6, D)

    def z(x):
        x = x.astype(np.float64)
        xc = x - x.mean(-1, keepdims=True)
        return gamma * xc / np.sqrt((xc**2).mean(-1, keepdims=True) + 1e-5) + beta

    pq = fm.rebased_features(q, gamma, beta, compact=compact)
    pk = fm.rebased_features(k, gamma, beta, compact=compact)
    assert pq.shape == (4, D * (D + 1) // 2 if compact else D * D)
    np.testing.assert_allclose(_dot(pq, pk), _dot(z(q), z(k)) ** 2, rtol=1e-4)


def test_compact_maps_keep_the_triangle_row_by_row_and_differentiate_without_scatter():
    """The compact quadratic block is vec(x x^T)'s upper triangle in row-major order (the state's
    row layout), the off-diagonal entries times sqrt(2); built from slices, its gradient has no
    gather or scatter. With index arrays (scatter-adds in the gradient) Based's MQAR train step at
    d64 took 17.5 s on a CPU against 10.2 s from slices (session 30)."""
    x = _x(3, 2, 5, D)
    a, b = np.triu_indices(D)
    want = np.asarray(x, np.float64)[..., a] * np.asarray(x, np.float64)[..., b] * np.where(
        a == b, 1.0, np.sqrt(2.0))
    quad = np.asarray(fm.taylor_features(x, compact=True), np.float64)[..., 1 + D:]
    np.testing.assert_allclose(quad * np.sqrt(2 * D), want, rtol=1e-6)
    for f in (lambda v: fm.taylor_features(v, compact=True),
              lambda v: fm.rebased_features(v, compact=True)):
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(jnp.sin(f(v)))))(x))
        assert "scatter" not in jaxpr and "gather" not in jaxpr


def test_hedgehog_is_a_softmax_over_both_signs_with_per_head_weights():
    x = _x(7, 2, 5, 3, D)                                   # [B, T, H, D]
    W, b = _x(8, 3, D, 4), _x(9, 3, 4)
    phi = np.asarray(fm.hedgehog_features(x, W, b), np.float64)
    assert phi.shape == (2, 5, 3, 8)
    z = np.einsum("bthd,hdf->bthf", x.astype(np.float64), W) + b
    e = np.exp(np.concatenate([z, -z], -1))
    np.testing.assert_allclose(phi, e / e.sum(-1, keepdims=True), rtol=1e-5)
    # a shared [D, F] weight is the per-head one with equal heads
    shared = fm.hedgehog_features(x, W[0])
    np.testing.assert_allclose(shared, fm.hedgehog_features(x, np.stack([W[0]] * 3)), rtol=1e-5)


def test_cosformer_reweighting_identity_and_positions():
    T, M = 7, 10
    q, k = _x(10, 1, T, 2, D), _x(11, 1, T, 2, D)
    pq, pk = fm.cosformer_features(q, max_len=M), fm.cosformer_features(k, max_len=M)
    assert pq.shape == (1, T, 2, 2 * D)
    got = np.einsum("bihf,bjhf->bhij", np.asarray(pq, np.float64), np.asarray(pk, np.float64))
    i = np.arange(T)
    rel = np.einsum("bihd,bjhd->bhij", np.maximum(q, 0).astype(np.float64), np.maximum(k, 0))
    np.testing.assert_allclose(got, rel * np.cos(np.pi * (i[:, None] - i[None, :]) / (2 * M)),
                               rtol=1e-5, atol=1e-6)
    # a piece decoded later with its absolute positions matches the full-sequence features
    tail = fm.cosformer_features(q[:, 4:], positions=np.arange(4, T), max_len=M)
    np.testing.assert_allclose(tail, pq[:, 4:], rtol=1e-6)


def test_orthogonal_random_projection_blocks_and_scalings():
    key = jax.random.PRNGKey(0)
    W = np.asarray(fm.orthogonal_random_projection(key, 10, 4, scaling="sqrt_dim"), np.float64)
    assert W.shape == (10, 4)
    np.testing.assert_allclose(np.linalg.norm(W, axis=-1), 2.0, rtol=1e-5)
    for block in (W[:4], W[4:8]):
        np.testing.assert_allclose(block @ block.T, 4.0 * np.eye(4), atol=1e-4)
    W = np.asarray(fm.orthogonal_random_projection(key, 4096, 8))
    # rows marginally N(0, I): squared norms average to dim, coordinates have unit variance
    assert abs(np.mean(np.sum(W**2, -1)) - 8) < 0.3 and abs(W.var() - 1) < 0.05
    with pytest.raises(ValueError, match="scaling"):
        fm.orthogonal_random_projection(key, 4, 4, scaling="none")


def test_performer_features_estimate_the_softmax_kernel():
    # |q' + k'|^2 ~ 1 keeps the estimator's relative deviation near sqrt((e - 1) / m) ~ 1%
    q, k = 0.4 * _x(12, 5, D), 0.4 * _x(13, 5, D)
    W = fm.orthogonal_random_projection(jax.random.PRNGKey(1), 16384, D)
    pq, pk = fm.performer_features(q, W), fm.performer_features(k, W)
    assert pq.shape == (5, 16384) and (np.asarray(pq) > 0).all()
    est = np.einsum("if,jf->ij", np.asarray(pq, np.float64), np.asarray(pk, np.float64))
    exact = np.exp(np.einsum("id,jd->ij", q, k).astype(np.float64) / np.sqrt(D))
    np.testing.assert_allclose(est, exact, rtol=0.05)
    # stabilised queries rescale each row of the kernel by one constant: normalised rows are equal
    ps = fm.performer_features(q, W, stabilize_axes=-1)
    st = np.einsum("if,jf->ij", np.asarray(ps, np.float64), np.asarray(pk, np.float64))
    np.testing.assert_allclose(st / st.sum(1, keepdims=True), est / est.sum(1, keepdims=True),
                               rtol=1e-4)


def test_rfa_features_estimate_the_gaussian_kernel():
    x, y = _x(14, 5, D), _x(15, 5, D)
    x, y = (a / np.linalg.norm(a, axis=-1, keepdims=True) for a in (x, y))
    W = fm.orthogonal_random_projection(jax.random.PRNGKey(2), 8192, D)
    px, py = fm.rfa_features(x, W, scale=1.5), fm.rfa_features(y, W, scale=1.5)
    assert px.shape == (5, 2 * 8192)
    est = np.einsum("if,jf->ij", np.asarray(px, np.float64), np.asarray(py, np.float64))
    dist2 = np.sum((x[:, None] - y[None]) ** 2, -1).astype(np.float64)
    np.testing.assert_allclose(est, np.exp(-(1.5**2) * dist2 / 2), atol=0.02)


@pytest.mark.parametrize("name", ["elu_plus_one", "relu_features", "taylor_features",
                                  "rebased_features", "hedgehog_features", "cosformer_features",
                                  "performer_features", "rfa_features"])
def test_dtype_is_preserved_under_jit(name):
    W = {"hedgehog_features": (_x(16, D, 3),),
         "performer_features": (_x(17, 8, D),), "rfa_features": (_x(17, 8, D),)}.get(name, ())
    fn = getattr(fm, name)
    x = jnp.asarray(_x(18, 2, 3, 2, D), jnp.bfloat16)
    y = jax.jit(fn)(x, *W)
    assert y.dtype == jnp.bfloat16 and y.shape[:3] == (2, 3, 2)
    y32 = fn(x.astype(jnp.float32), *W)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=2e-2, atol=2e-2)
