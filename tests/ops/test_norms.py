"""Normalisations: values against NumPy, gradients at zero, grouping, gating, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.ops import norms


def _x(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rms(x, eps=1e-6):
    x = x.astype(np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def _ln(x, eps=1e-5):
    x = x.astype(np.float64)
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt((xc**2).mean(-1, keepdims=True) + eps)


def _silu(x):
    return x / (1 + np.exp(-x.astype(np.float64)))


def test_l2norm_values_and_finite_gradient_at_zero():
    x = _x(0, 3, 8)
    want = x / np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(norms.l2norm(x), want, rtol=1e-6)
    np.testing.assert_allclose(norms.l2norm(x, axis=0),
                               x / np.sqrt((x.astype(np.float64) ** 2).sum(0) + 1e-6), rtol=1e-6)
    # at x = 0 the Jacobian is I / sqrt(eps), not the NaN of x / ||x||
    J = jax.jacobian(lambda v: norms.l2norm(v, eps=1e-6))(jnp.zeros(4))
    np.testing.assert_allclose(J, np.eye(4) / np.sqrt(1e-6), rtol=1e-5)


def test_rms_norm_shared_and_per_head_weights():
    x = _x(1, 2, 5, 3, 8)                                   # [B, T, H, D]
    w_shared, w_head = _x(2, 8), _x(3, 3, 8)
    np.testing.assert_allclose(norms.rms_norm(x), _rms(x), rtol=1e-5)
    for w in (w_shared, w_head):
        np.testing.assert_allclose(norms.rms_norm(x, w), _rms(x) * w, rtol=1e-5, atol=1e-6)


def test_layer_norm():
    x, w, b = 3 + _x(4, 4, 8), _x(5, 8), _x(6, 8)
    np.testing.assert_allclose(norms.layer_norm(x, w, b), _ln(x) * w + b, rtol=1e-5, atol=1e-5)


def test_group_rms_norm_is_per_head_rms_norm_on_flat_heads():
    x = _x(7, 2, 5, 3, 8)
    w = _x(8, 24)
    flat = norms.group_rms_norm(x.reshape(2, 5, 24), 3, w)
    np.testing.assert_allclose(flat, (_rms(x) * w.reshape(3, 8)).reshape(2, 5, 24), rtol=1e-5,
                               atol=1e-6)


def test_group_norm_normalises_each_group():
    x = 2 + 3 * _x(9, 4, 12)
    w, b = _x(10, 12), _x(11, 12)
    y = np.asarray(norms.group_norm(x, 3), np.float64).reshape(4, 3, 4)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-3)
    want = _ln(x.reshape(4, 3, 4)).reshape(4, 12) * w + b
    np.testing.assert_allclose(norms.group_norm(x, 3, w, b), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm(norm_before_gate):
    x, g, w = _x(12, 3, 8), 2 * _x(13, 3, 8), _x(14, 8)
    y = norms.gated_rms_norm(x, g, w, norm_before_gate=norm_before_gate)
    want = _rms(x) * _silu(g) if norm_before_gate else _rms(x * _silu(g))
    np.testing.assert_allclose(y, want * w, rtol=1e-5, atol=1e-6)
    # grouped statistics (Mamba-2's ngroups): each half normalised on its own
    y2 = norms.gated_rms_norm(x, g, None, num_groups=2, norm_before_gate=norm_before_gate)
    xg = x.reshape(3, 2, 4)
    gg = _silu(g).reshape(3, 2, 4)
    want2 = _rms(xg) * gg if norm_before_gate else _rms(xg * gg)
    np.testing.assert_allclose(y2, want2.reshape(3, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [
    lambda x: norms.l2norm(x), lambda x: norms.rms_norm(x, jnp.ones(8)),
    lambda x: norms.layer_norm(x), lambda x: norms.group_rms_norm(x, 2),
    lambda x: norms.group_norm(x, 4), lambda x: norms.gated_rms_norm(x, x)],
    ids=["l2norm", "rms_norm", "layer_norm", "group_rms_norm", "group_norm", "gated_rms_norm"])
def test_bf16_in_bf16_out(fn):
    x = jnp.asarray(100 * _x(15, 4, 8), jnp.bfloat16)
    y = jax.jit(fn)(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), fn(x.astype(jnp.float32)), rtol=1e-2,
                               atol=1e-2)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_groups"):
        norms.group_rms_norm(np.ones((2, 10), np.float32), 3)
    with pytest.raises(ValueError, match="gate"):
        norms.gated_rms_norm(np.ones((2, 8), np.float32), np.ones((2, 4), np.float32))
