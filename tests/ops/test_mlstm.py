"""Op-specific tests for mlstm (the contract suite covers the rest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.ops.mlstm import mlstm
from tests.ops.spec_ssm import mlstm_reference
from tests.utils import assert_close

# one compilation per shape instead of op-by-op dispatch (CI has 2 cores)
mlstm_jit = jax.jit(mlstm, static_argnames=("scale", "chunk_size", "impl", "eps"))
IMPLS = ["recurrent", "chunk"]


def _draw(rng, B=2, T=40, H=2, K=8, V=6, i_range=(-4.0, 6.0), f_range=(-2.0, 5.0)):
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    return (f32(B, T, H, K), f32(B, T, H, K), f32(B, T, H, V),
            rng.uniform(*i_range, (B, T, H)).astype(np.float32),
            rng.uniform(*f_range, (B, T, H)).astype(np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_case(impl):
    """K = V = 1, q = k = 1, scale 1, sigmoid(f) = 1/2, v = (2, 3), i = (0, log 2).
    t=1: m = max(log 1/2, 0) = 0, C = 2, n = 1, h = 2 / (1 + eps).
    t=2: m = log 2, C = 2/4 + 3 = 3.5, n = 1/4 + 1 = 1.25, h = 3.5 / (1.25 + eps) = 2.8."""
    one = jnp.ones((1, 2, 1, 1))
    v = jnp.array([2.0, 3.0]).reshape(1, 2, 1, 1)
    i = jnp.array([0.0, np.log(2.0)]).reshape(1, 2, 1)
    h, (C, n, m) = mlstm_jit(one, one, v, i, jnp.zeros((1, 2, 1)), scale=1.0, impl=impl, eps=0.0)
    np.testing.assert_allclose(np.asarray(h).ravel(), [2.0, 2.8], rtol=1e-6)
    np.testing.assert_allclose([float(C.squeeze()), float(n.squeeze()), float(m.squeeze())],
                               [3.5, 1.25, np.log(2.0)], rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_h_is_invariant_to_the_stabiliser(impl):
    """(C, n, m) and (C e^-d, n e^-d, m + d) are the same memory: with eps = 0, h is identical
    and so is the unstabilised final memory C e^m, n e^m."""
    rng = np.random.default_rng(0)
    q, k, v, i, f = _draw(rng)
    s0 = tuple(rng.standard_normal(s).astype(np.float32) for s in ((2, 2, 8, 6), (2, 2, 8), (2, 2)))
    d = np.float32(3.0)
    s1 = (s0[0] * np.exp(-d), s0[1] * np.exp(-d), s0[2] + d)
    h0, (C0, n0, m0) = mlstm_jit(q, k, v, i, f, initial_state=s0, eps=0.0, impl=impl, chunk_size=16)
    h1, (C1, n1, m1) = mlstm_jit(q, k, v, i, f, initial_state=s1, eps=0.0, impl=impl, chunk_size=16)
    assert_close(h1, h0, 1e-5, "h")
    e0, e1 = jnp.exp(m0)[..., None], jnp.exp(m1)[..., None]
    assert_close(C1 * e1[..., None], C0 * e0[..., None], 1e-5, "C e^m")
    assert_close(n1 * e1, n0 * e0, 1e-5, "n e^m")


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_sizes_agree_with_the_reference(chunk_size):
    rng = np.random.default_rng(1)
    q, k, v, i, f = _draw(rng, B=1, T=23)
    h, S = mlstm_jit(q, k, v, i, f, impl="chunk", chunk_size=chunk_size)
    rh, rS = mlstm_reference(q, k, v, i, f, None, None, 8**-0.5)
    assert_close(h, rh, 2e-5, "h")
    for name, a, b in zip("Cnm", S, rS, strict=True):
        assert_close(a, b, 2e-5, name)


def test_packed_documents_equal_separate_sequences():
    """A reset restarts from the zero state (0, 0, m = 0): a packed document computes exactly what
    it computes alone, stabiliser included."""
    rng = np.random.default_rng(2)
    q, k, v, i, f = _draw(rng, B=1, T=30)
    seg = np.array([[0] * 13 + [1] * 17], np.int32)
    cut = lambda s: [x[:, s] for x in (q, k, v, i, f)]
    for impl in IMPLS:
        h, S = mlstm_jit(q, k, v, i, f, segment_ids=seg, impl=impl, chunk_size=8)
        h1, _ = mlstm_jit(*cut(slice(0, 13)), impl=impl, chunk_size=8)
        h2, S2 = mlstm_jit(*cut(slice(13, 30)), impl=impl, chunk_size=8)
        assert_close(h, jnp.concatenate([h1, h2], 1), 1e-5, f"{impl} packed output")
        for name, a, b in zip("Cnm", S, S2, strict=True):
            assert_close(a, b, 1e-5, f"{impl} last document's {name}")


def test_large_input_gates_are_stable():
    """Input-gate pre-activations up to 30 (exp(30) ~ 1e13, left unstabilised), all in [20, 30]
    (batch row 0) or spread over [-30, 30] (row 1): chunk == recurrent == float64 reference, and
    all gradients are finite and agree. q and k are positive, so |n . q| stays away from 0, where
    h = num / den is ill-conditioned in any precision (the floor exp(-m) ~ e^-25 does not bind)."""
    rng = np.random.default_rng(3)
    q, k, v, i, f = _draw(rng, B=2, T=300, i_range=(-30.0, 30.0), f_range=(-3.0, 8.0))
    q, k = np.exp(0.5 * q), np.exp(0.5 * k)
    i[0] = rng.uniform(20.0, 30.0, i[0].shape)
    rh, rS = mlstm_reference(q, k, v, i, f, None, None, 8**-0.5)
    do = rng.standard_normal(rh.shape).astype(np.float32)

    def loss(impl, q, k, v, i, f):
        h, (C, n, m) = mlstm_jit(q, k, v, i, f, impl=impl)
        return jnp.sum(h * do) + jnp.sum(C) + jnp.sum(n) + jnp.sum(m), (h, (C, n, m))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)
    (gc, (h, S)), (gr, _) = grad("chunk", q, k, v, i, f), grad("recurrent", q, k, v, i, f)
    assert_close(h, rh, 1e-5, "h")
    for name, a, b in zip("Cnm", S, rS, strict=True):
        assert_close(a, b, 1e-5, name)
    for name, a, b in zip("qkvif", gc, gr, strict=True):
        assert np.isfinite(np.asarray(a)).all(), f"d{name} not finite"
        assert_close(a, b, 2e-4, f"d{name}")


def test_no_nan_from_extreme_finite_gates():
    """Gates far outside any trained range (|i| up to 200, forget pre-activations to -50 and 50,
    a stretch where m_t falls to -200): h, the state and the gradients stay finite, and the two
    impls agree on h and the state."""
    rng = np.random.default_rng(4)
    q, k, v, i, f = _draw(rng, B=1, T=70, i_range=(-200.0, 200.0), f_range=(-50.0, 50.0))
    i[0, :35] = -200.0
    f[0, :35] = -50.0

    def loss(impl, q, k, v, i, f):
        h, (C, n, m) = mlstm_jit(q, k, v, i, f, impl=impl, chunk_size=16)
        return jnp.sum(h) + jnp.sum(C) + jnp.sum(n) + jnp.sum(m), (h, (C, n, m))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)
    (gc, (hc, Sc)), (gr, (hr, Sr)) = grad("chunk", q, k, v, i, f), grad("recurrent", q, k, v, i, f)
    # h = num / den with |n . q| near cancellation at a few steps: both impls sit ~1e-4 from float64
    assert_close(hc, hr, 2e-4, "h")
    for name, a, b in zip("Cnm", Sc, Sr, strict=True):
        assert_close(a, b, 1e-5, name)
    for impl, grads in (("chunk", gc), ("recurrent", gr)):
        for name, g in zip("qkvif", grads, strict=True):
            assert np.isfinite(np.asarray(g)).all(), f"{impl}: d{name} not finite"


def test_grouped_heads_equal_repeated_heads():
    rng = np.random.default_rng(5)
    q, k, v, i, f = _draw(rng, H=4)
    q, k = q[:, :, :2], k[:, :, :2]
    h, S = mlstm_jit(q, k, v, i, f, impl="chunk", chunk_size=16)
    h2, S2 = mlstm_jit(np.repeat(q, 2, 2), np.repeat(k, 2, 2), v, i, f, impl="recurrent")
    assert_close(h, h2, 1e-5, "grouped output")
    for name, a, b in zip("Cnm", S, S2, strict=True):
        assert_close(a, b, 1e-5, name)


def test_chunk_backward_memory_is_linear_in_T():
    """jit(grad) of the chunk path keeps chunk states, never per-step states or a [T, T] matrix."""
    B, H, K, V = 1, 1, 64, 64

    def temp_bytes(T):
        s = jax.ShapeDtypeStruct
        qkv = [s((B, T, H, K), jnp.float32)] * 2 + [s((B, T, H, V), jnp.float32)]
        gates = [s((B, T, H), jnp.float32)] * 2
        loss = lambda *a: mlstm(*a, impl="chunk")[0].sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*qkv, *gates).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    t1, t2 = temp_bytes(4096), temp_bytes(8192)
    assert t1 < 4096 * K * V * 4 / 2, f"{t1 / 2**20:.1f} MiB of temporaries at T=4096"
    assert t2 < 2.1 * t1, f"temporaries grow faster than T: {t1 / 2**20:.1f}, {t2 / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(i=np.zeros((2, 8, 2, 1), np.float32)), "i must have rank 3"),
        (dict(f=np.zeros((2, 8, 3), np.float32)), "f must have shape"),
        (dict(v=np.ones((2, 8, 3, 3), np.float32)), "heads"),
        (dict(initial_state=np.zeros((2, 2, 4, 3), np.float32)), "tuple"),
        (dict(initial_state=(np.zeros((2, 2, 4, 3)), np.zeros((2, 2, 4)))), "tuple"),
        (dict(initial_state=(np.zeros((2, 2, 4, 3)), np.zeros((2, 2, 3)), np.zeros((2, 2)))),
         r"initial_state n must have shape \[B, H, K\]"),
        (dict(initial_state=(np.zeros((2, 2, 4, 3)), np.zeros((2, 2, 4)), np.zeros((2, 2, 1)))),
         r"initial_state m must have shape \[B, H\]"),
        (dict(segment_ids=np.zeros((2, 7), np.int32)), "segment_ids"),
        (dict(impl="fast"), "impl"),
        (dict(chunk_size=-1), "chunk_size"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    args = dict(q=np.ones((2, 8, 2, 4), np.float32), k=np.ones((2, 8, 2, 4), np.float32),
                v=np.ones((2, 8, 2, 3), np.float32), i=np.zeros((2, 8, 2), np.float32),
                f=np.zeros((2, 8, 2), np.float32))
    with pytest.raises(ValueError, match=match):
        mlstm(**dict(args, **change))
