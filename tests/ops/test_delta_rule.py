"""Op-specific tests for delta_rule, gated_delta_rule, efla_beta and delta_product (the contract
suite covers the rest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.ops.delta_product import delta_product
from linear_jax.ops.delta_rule import delta_rule, efla_beta, gated_delta_rule
from tests.ops.spec_delta import delta_reference
from tests.utils import assert_close, l2norm, segments

IMPLS = ("recurrent", "chunk")
# jitted: op-by-op dispatch of the chunk forms costs several times their compilation (CI has 2
# cores). The bad-input tests call the ops themselves: some checks need concrete values.
_STATIC = ("exact", "scale", "chunk_size", "impl")
delta_rule_jit = jax.jit(delta_rule, static_argnames=_STATIC)
gated_delta_rule_jit = jax.jit(gated_delta_rule, static_argnames=_STATIC)
delta_product_jit = jax.jit(delta_product, static_argnames=("scale", "chunk_size", "impl"))


def _col(*x):
    return jnp.asarray(x, jnp.float32).reshape(1, len(x), 1)


def test_reference_on_a_hand_computed_case():
    # K = 2, V = 1, q = (1, 1), scale 1. Writing 2 then 5 under key e1 with beta = 1 overwrites
    # (S = [5, 0], not [7, 0]); then beta = 1/2 writes half of 3 under e2: S = [5, 1.5].
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    q = jnp.ones((1, 3, 1, 2))
    k = jnp.asarray([e1, e1, e2]).reshape(1, 3, 1, 2)
    v = jnp.asarray([2.0, 5.0, 3.0]).reshape(1, 3, 1, 1)
    for impl in IMPLS:
        kw = dict(scale=1.0, impl=impl, chunk_size=2)
        o, S = delta_rule_jit(q, k, v, _col(1.0, 1.0, 0.5), **kw)
        np.testing.assert_allclose(np.ravel(o), [2.0, 5.0, 6.5], rtol=1e-6)
        np.testing.assert_allclose(np.ravel(S), [5.0, 1.5], rtol=1e-6)
        # beta = 2 reflects along e1: S = [2, 0] -> -[2, 0] + 2 * 5 e1 = [8, 0]
        o, _ = delta_rule_jit(q, k, v, _col(1.0, 2.0, 0.5), **kw)
        np.testing.assert_allclose(np.ravel(o), [2.0, 8.0, 9.5], rtol=1e-6)
        # a decay of 1/2 before step 3: S = [2.5, 0] + 0.5 * (3 - 0) e2 = [2.5, 1.5]
        g = jnp.log(_col(1.0, 1.0, 0.5))
        o, _ = gated_delta_rule_jit(q, k, v, g, _col(1.0, 1.0, 0.5), **kw)
        np.testing.assert_allclose(np.ravel(o), [2.0, 5.0, 4.0], rtol=1e-6)
        # a reset before step 3 drops [5, 0]: o_3 = 1.5
        o, _ = delta_rule_jit(q, k, v, _col(1.0, 1.0, 0.5), segment_ids=jnp.asarray([[0, 0, 1]]),
                              **kw)
        np.testing.assert_allclose(np.ravel(o), [2.0, 5.0, 1.5], rtol=1e-6)
        # the same three steps as two tokens of n = 2 (a last step with beta = 0); the gate of
        # token 2 acts before its first step
        kp = jnp.concatenate([k, jnp.zeros((1, 1, 1, 2))], 1).reshape(1, 2, 2, 1, 2)
        vp = jnp.concatenate([v, jnp.zeros((1, 1, 1, 1))], 1).reshape(1, 2, 2, 1, 1)
        bp = jnp.asarray([1.0, 1.0, 0.5, 0.0]).reshape(1, 2, 2, 1)
        o, S = delta_product_jit(q[:, :2], kp, vp, bp, jnp.log(_col(1.0, 0.5)), **kw)
        np.testing.assert_allclose(np.ravel(o), [5.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(np.ravel(S), [2.5, 1.5], rtol=1e-6)


def test_negative_eigenvalues_track_parity():
    """beta in {0, 2} on a fixed unit key flips the state's sign at every 1: o_t = (-1)^(#ones).

    No beta in [0, 1] can do this (the eigenvalue along k stays >= 0)."""
    rng = np.random.default_rng(0)
    T = 300
    x = rng.integers(0, 2, T)
    k = jnp.zeros((1, T, 1, 4)).at[..., 0].set(1.0)
    v = jnp.zeros((1, T, 1, 1))
    S0 = jnp.zeros((1, 1, 4, 1)).at[0, 0, 0, 0].set(1.0)
    want = (-1.0) ** np.cumsum(x)
    for impl in IMPLS:
        o, _ = delta_rule_jit(k, k, v, jnp.asarray(2.0 * x, jnp.float32).reshape(1, T, 1),
                              scale=1.0, initial_state=S0, impl=impl)
        np.testing.assert_allclose(np.ravel(o), want, atol=1e-4)


# ---- EFLA ----------------------------------------------------------------------------------


def _rk4_unit_time(S, k, v, beta, steps=400):
    """float64 RK4 of dS/dt = beta k (v^T - k^T S) over t in [0, 1]. S [K, V], k [K], v [V]."""
    f = lambda S: beta * np.outer(k, v - k @ S)
    h = 1.0 / steps
    for _ in range(steps):
        a = f(S)
        b = f(S + h / 2 * a)
        c = f(S + h / 2 * b)
        d = f(S + h * c)
        S = S + h / 6 * (a + 2 * b + 2 * c + d)
    return S


def test_exact_matches_fine_step_integration_of_the_ode():
    rng = np.random.default_rng(1)
    T, K, V = 4, 5, 3
    q = rng.standard_normal((1, T, 1, K))
    k = l2norm(rng.standard_normal((1, T, 1, K))) * rng.uniform(0.3, 2.0, (1, T, 1, 1))
    v = rng.standard_normal((1, T, 1, V))
    beta = rng.uniform(0.0, 2.0, (1, T, 1))
    S0 = rng.standard_normal((1, 1, K, V))
    S, want = S0[0, 0].astype(np.float64), []
    for t in range(T):
        S = _rk4_unit_time(S, k[0, t, 0].astype(np.float64), v[0, t, 0], beta[0, t, 0])
        want.append(q[0, t, 0] @ S)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, beta)]
    for impl in IMPLS:
        o, S_end = delta_rule_jit(*args, exact=True, scale=1.0, initial_state=S0, impl=impl,
                                  chunk_size=2)
        assert_close(o[0, :, 0], np.stack(want), 1e-5, f"{impl} exact output")
        assert_close(S_end[0, 0], S, 1e-5, f"{impl} exact state")
    # one Euler step (the plain delta rule) is far from the flow at these key norms
    o, _ = delta_rule_jit(*args, scale=1.0, initial_state=S0, impl="recurrent")
    assert np.linalg.norm(np.asarray(o[0, :, 0]) - np.stack(want)) > 1e-2 * np.linalg.norm(want)


def _phi64(z):
    """float64 (1 - exp(-z)) / z and its derivative (series near 0)."""
    if z < 1e-3:
        return 1 - z / 2 + z**2 / 6 - z**3 / 24, -0.5 + z / 3 - z**2 / 8 + z**3 / 30
    return -np.expm1(-z) / z, (z * np.exp(-z) + np.expm1(-z)) / z**2


@pytest.mark.parametrize("lam", [0.0, 1e-9, 1e-4, 0.02, 0.0249, 0.0251, 0.3, 3.0, 40.0])
def test_efla_beta_value_and_gradient_across_key_norms(lam):
    """Value and gradients against float64 on both sides of the series switch, and at k = 0."""
    beta = 2.0  # z = beta * lam crosses the switch at lam = 0.025
    k = np.full((1, 1, 1, 4), np.sqrt(lam / 4), np.float32)
    lam = float(np.sum(k.astype(np.float64) ** 2))
    phi, dphi = _phi64(beta * lam)
    f = lambda k, b: efla_beta(k, b)[0, 0, 0]
    b = jnp.full((1, 1, 1), beta, jnp.float32)
    val = f(jnp.asarray(k), b)
    dk, db = jax.grad(f, argnums=(0, 1))(jnp.asarray(k), b)
    np.testing.assert_allclose(float(val), beta * phi, rtol=1e-6)
    # d/dbeta (1 - exp(-beta lam)) / lam = exp(-beta lam)
    np.testing.assert_allclose(float(db[0, 0, 0]), np.exp(-beta * lam), rtol=1e-5)
    # d/dk = beta^2 phi'(z) * 2k
    np.testing.assert_allclose(np.asarray(dk, np.float64), beta**2 * dphi * 2 * k,
                               rtol=1e-5, atol=1e-30)


def test_gated_exact_matches_reference():
    rng = np.random.default_rng(2)
    B, T, H, K, V = 1, 21, 2, 6, 5
    q, v = rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, V))
    k = l2norm(rng.standard_normal((B, T, H, K))) * rng.uniform(0.2, 2.0, (B, T, H, 1))
    beta, g = rng.uniform(0, 2, (B, T, H)), -rng.uniform(0, 2, (B, T, H))
    seg = segments(rng, B, T, p=0.1)
    ro, rS = delta_reference(q, k, v, beta, g, None, seg, K**-0.5, exact=True)
    for impl in IMPLS:
        o, S = gated_delta_rule_jit(*(x.astype(np.float32) for x in (q, k, v, g, beta)),
                                    exact=True, segment_ids=seg, impl=impl, chunk_size=8)
        assert_close(o, ro, 2e-5, f"{impl} output")
        assert_close(S, rS, 2e-5, f"{impl} state")


# ---- strong gates, long sequences, memory ---------------------------------------------------

GATES = {
    "zero": lambda rng, s: np.zeros(s, np.float32),
    "tiny": lambda rng, s: np.full(s, -1e-4, np.float32),
    "minus5": lambda rng, s: np.full(s, -5.0, np.float32),
    "minus20": lambda rng, s: np.full(s, -20.0, np.float32),
    "uniform-20-0": lambda rng, s: rng.uniform(-20.0, 0.0, s).astype(np.float32),
    "mixed": lambda rng, s: np.where(rng.uniform(size=s) < 0.5, 0.0, -1e3).astype(np.float32),
}


def _draw(rng, B, T, H, K, V):
    q, v = rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, V))
    k = l2norm(rng.standard_normal((B, T, H, K)))
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, H))))
    return [x.astype(np.float32) for x in (q, k, v, beta)]


@pytest.fixture(scope="module")
def gate_grad():
    T, H, K, V = 2048, 1, 8, 8
    rng = np.random.default_rng(3)
    q, k, v, beta = _draw(rng, 1, T, H, K, V)
    seg = jnp.asarray(segments(rng, 1, T, p=0.002))
    do = jnp.asarray(rng.standard_normal((1, T, H, V)), jnp.float32)

    def loss(impl, q, k, v, g, beta):
        o, S = gated_delta_rule(q, k, v, g, beta, segment_ids=seg, impl=impl)
        return jnp.sum(o * do) + jnp.sum(S)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5)), static_argnums=0)
    return rng, (q, k, v, beta), grad


@pytest.mark.parametrize("gate", list(GATES))
def test_extreme_gates_forward_and_backward(gate_grad, gate):
    """T = 2048: chunk == recurrent, the loss and the gradient of every input, and nothing
    non-finite (gates from none to -1e3, constant, uniform and mixed)."""
    rng, (q, k, v, beta), grad = gate_grad
    g = GATES[gate](rng, beta.shape)
    (lc, gc), (lr, gr) = grad("chunk", q, k, v, g, beta), grad("recurrent", q, k, v, g, beta)
    assert np.isfinite(float(lc))
    assert abs(float(lc) - float(lr)) <= 1e-4 * max(1.0, abs(float(lr)))
    for name, a, b in zip(["q", "k", "v", "g", "beta"], gc, gr, strict=True):
        assert_close(a, b, 1e-5, f"d{name}")


def test_chunk_backward_memory_is_linear_in_T():
    """jit(grad) of the chunk path keeps chunk states, never per-step states or a [T, T] matrix."""
    B, H, K, V = 1, 1, 64, 64

    def temp_bytes(T):
        s = jax.ShapeDtypeStruct
        args = (s((B, T, H, K), jnp.float32), s((B, T, H, K), jnp.float32),
                s((B, T, H, V), jnp.float32), s((B, T, H), jnp.float32), s((B, T, H), jnp.float32))
        loss = lambda *a: gated_delta_rule(*a, impl="chunk")[0].sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    t1, t2 = temp_bytes(8192), temp_bytes(16384)
    per_step_states = 8192 * K * V * 4          # what a stored [T, K, V] would take (128 MiB)
    assert t1 < per_step_states / 2, f"{t1 / 2**20:.1f} MiB of temporaries at T=8192"
    assert t2 < 2.1 * t1, (f"temporaries grow faster than T: {t1 / 2**20:.1f} -> "
                           f"{t2 / 2**20:.1f} MiB")


# ---- structure ------------------------------------------------------------------------------


def test_delta_product_with_one_step_is_the_gated_delta_rule():
    rng = np.random.default_rng(5)
    q, k, v, beta = _draw(rng, 2, 19, 2, 6, 5)
    g = -rng.uniform(0, 1, beta.shape).astype(np.float32)
    seg = segments(rng, 2, 19, p=0.1)
    o, S = gated_delta_rule_jit(q, k, v, g, beta, segment_ids=seg, impl="recurrent")
    for impl in IMPLS:
        op, Sp = delta_product_jit(q, k[:, :, None], v[:, :, None], beta[:, :, None], g,
                                   segment_ids=seg, impl=impl, chunk_size=8)
        assert_close(op, o, 1e-5, f"{impl} output")
        assert_close(Sp, S, 1e-5, f"{impl} state")


def test_no_gradient_crosses_a_document_boundary():
    rng = np.random.default_rng(6)
    q, k, v, beta = _draw(rng, 1, 24, 1, 4, 4)
    g = -rng.uniform(0, 1, beta.shape).astype(np.float32)
    seg = np.array([[0] * 10 + [1] * 14], np.int32)
    loss = lambda k, b: gated_delta_rule(q, k, v, g, b, segment_ids=seg, impl="chunk",
                                         chunk_size=8)[0][:, 10:].sum()
    dk, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(k, beta)
    assert np.all(np.asarray(dk)[:, :10] == 0.0) and np.all(np.asarray(db)[:, :10] == 0.0)
    assert np.any(np.asarray(dk)[:, 10:] != 0.0)


# ---- bad input ------------------------------------------------------------------------------

_q = np.ones((2, 8, 2, 4), np.float32)
_v = np.ones((2, 8, 2, 3), np.float32)
_b = np.full((2, 8, 2), 0.5, np.float32)
_kp = np.ones((2, 8, 3, 2, 4), np.float32)
_vp = np.ones((2, 8, 3, 2, 3), np.float32)
_bp = np.full((2, 8, 3, 2), 0.5, np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: delta_rule(_q[0], _q, _v, _b), "q must have rank 4"),
        (lambda: delta_rule(_q, _q, _v[:1], _b), "batch size"),
        (lambda: delta_rule(_q, _q, _v[:, :5], _b), "sequence length"),
        (lambda: delta_rule(_q, _q, _v[:, :, :1], _b), "heads"),
        (lambda: delta_rule(_q, _q, _v, _b[..., None]), "beta must have rank 3"),
        (lambda: delta_rule(_q, _q, _v, _b[:1]), r"beta must have shape \[B, T, H\]"),
        (lambda: delta_rule(_q, _q, _v, _b[:, :5]), r"beta must have shape \[B, T, H\]"),
        (lambda: delta_rule(_q, _q, _v, _b[:, :, :1]), r"beta must have shape \[B, T, H\]"),
        (lambda: delta_rule(_q, _q, _v, _b.astype(np.int32)), "beta must be a floating-point"),
        (lambda: delta_rule(_q, _q, _v, _b, segment_ids=np.zeros((2, 8), np.float32)),
         "segment_ids must be an integer"),
        (lambda: delta_rule(_q, _q, _v, _b, segment_ids=np.zeros((2, 7), np.int32)),
         "segment_ids must have shape"),
        (lambda: delta_rule(_q, _q, _v, _b, initial_state=np.zeros((2, 2, 3, 4))),
         "initial_state"),
        (lambda: delta_rule(_q, _q, _v, _b, chunk_size=0), "chunk_size"),
        (lambda: delta_rule(_q, _q, _v, _b, impl="fast"), "impl"),
        (lambda: gated_delta_rule(_q, _q, _v, -_b[:, :5], _b), r"g must have shape \[B, T, H\]"),
        (lambda: gated_delta_rule(_q, _q, _v, _b, _b), "log-space decays"),
        (lambda: delta_product(_q, _q, _vp, _bp), "k must have rank 5"),
        (lambda: delta_product(_q, _kp, _v, _bp), "v must have rank 5"),
        (lambda: delta_product(_q, _kp, _vp, _b), "beta must have rank 4"),
        (lambda: delta_product(_q[:1], _kp, _vp, _bp), "batch size"),
        (lambda: delta_product(_q, _kp[:, :5], _vp, _bp), "sequence length"),
        (lambda: delta_product(_q, _kp, _vp[:, :, :2], _bp), "steps per token n"),
        (lambda: delta_product(_q[..., :3], _kp, _vp, _bp), "key dim K"),
        (lambda: delta_product(_q, _kp, _vp, _bp[..., :1]), "value heads H"),
        (lambda: delta_product(_q, _kp, _vp, _bp, -_b[..., :1]), "g must have shape"),
        (lambda: delta_product(_q, _kp, _vp, _bp, segment_ids=np.zeros((2, 8))),
         "segment_ids must be an integer"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
