"""Op-specific tests for linear_attention, simple_gla and gla (the contract suite does the rest)."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.ops.gla import gla
from linear_jax.ops.linear_attention import linear_attention
from linear_jax.ops.simple_gla import simple_gla
from tests.ops.spec_decay import decay_reference
from tests.utils import assert_close, segments

# jitted: op-by-op dispatch of the chunk forms costs several times their compilation (CI has 2
# cores). The bad-input tests call the ops themselves: some checks need concrete values.
_STATIC = ("scale", "chunk_size", "impl")
simple_gla_jit = jax.jit(simple_gla, static_argnames=_STATIC)
gla_jit = jax.jit(gla, static_argnames=_STATIC)
linear_attention_jit = jax.jit(linear_attention, static_argnames=_STATIC + ("normalize",))


def test_reference_on_a_hand_computed_case():
    # K = V = 1, two steps, decay 1/2: S1 = 1*2 = 2, o1 = 2; S2 = 0.5*2 + 1*3 = 4, o2 = 4 * 1.
    q = jnp.ones((1, 2, 1, 1))
    k = jnp.array([1.0, 1.0]).reshape(1, 2, 1, 1)
    v = jnp.array([2.0, 3.0]).reshape(1, 2, 1, 1)
    g = jnp.log(jnp.array([1.0, 0.5])).reshape(1, 2, 1)
    for impl in ("recurrent", "chunk"):
        o, S = simple_gla_jit(q, k, v, g, scale=1.0, impl=impl)
        np.testing.assert_allclose(np.asarray(o).ravel(), [2.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(S).ravel(), [4.0], rtol=1e-6)
    # a reset at t = 1 drops S1: o2 = 3
    o, _ = simple_gla_jit(q, k, v, g, scale=1.0, segment_ids=jnp.array([[0, 1]]),
                          impl="recurrent")
    np.testing.assert_allclose(np.asarray(o).ravel(), [2.0, 3.0], rtol=1e-6)


def _draw(rng, B, T, H, K, V, gate):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    q, k, v = f(B, T, H, K), f(B, T, H, K), f(B, T, H, V)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    shape = (B, T, H) if gate == "scalar" else (B, T, H, K)
    return q, k, v, shape


GATES = {
    "zero": lambda rng, s: np.zeros(s, np.float32),
    "tiny": lambda rng, s: np.full(s, -1e-4, np.float32),
    "minus5": lambda rng, s: np.full(s, -5.0, np.float32),
    "minus20": lambda rng, s: np.full(s, -20.0, np.float32),
    "uniform-20-0": lambda rng, s: rng.uniform(-20.0, 0.0, s).astype(np.float32),
    "mixed": lambda rng, s: np.where(rng.uniform(size=s) < 0.5, 0.0, -1e3).astype(np.float32),
}
OPS = {"simple_gla": (simple_gla, "scalar"), "gla": (gla, "vector")}


@functools.cache
def _long_value_and_grad(name):
    """jit(value_and_grad) of one op, inputs as arguments: one compilation serves every gate."""
    op = OPS[name][0]

    def loss(impl, q, k, v, g, seg, do):
        o, S = op(q, k, v, g, segment_ids=seg, impl=impl)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S)

    return jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)


# op-major, so that a worker running one op's cases compiles that op once
@pytest.mark.parametrize("name,gate", [(n, g) for n in OPS for g in GATES],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_extreme_gates_forward_and_backward(name, gate):
    """T = 8192 bf16 inputs with fp32 state: chunk == recurrent, outputs and every gradient, and
    nothing non-finite (gates from none to -1e3, constant, uniform and mixed)."""
    rng = np.random.default_rng(0)
    q, k, v, gshape = _draw(rng, 1, 8192, 1, 8, 8, OPS[name][1])
    g = GATES[gate](rng, gshape)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    seg = jnp.asarray(segments(rng, 1, 8192, p=0.002))
    do = jnp.asarray(rng.standard_normal((1, 8192, 1, 8)), jnp.float32)
    grad = _long_value_and_grad(name)
    (lc, gc), (lr, gr) = grad("chunk", q, k, v, g, seg, do), grad("recurrent", q, k, v, g, seg, do)
    assert np.isfinite(float(lc))
    # the loss sums 65k bf16-rounded products (|o do| ~ 2e4 in all) that cancel to ~1: the two
    # forms' roundings of o move it by ~1e-3 (and by as much between XLA's optimisation levels)
    assert abs(float(lc) - float(lr)) <= 1e-2 * max(1.0, abs(float(lr)))
    for n, a, b in zip("qkvg", gc, gr, strict=True):
        assert_close(a.astype(jnp.float32), b.astype(jnp.float32), 2e-2, f"d{n}")


def test_linear_attention_normalize_is_a_ratio():
    rng = np.random.default_rng(2)
    q, k, v = (np.exp(0.2 * rng.standard_normal((1, 33, 2, 8))).astype(np.float32)
               for _ in range(3))
    o, S = linear_attention_jit(q, k, v, normalize=True, impl="chunk", chunk_size=16)
    num, _ = decay_reference(*(x.astype(np.float64) for x in (q, k, v)), None, None, None, 8**-0.5)
    den = 8**-0.5 * np.einsum("bthk,bthk->bth", q, np.cumsum(k, axis=1))
    assert_close(o, num / (den[..., None] + 1e-6), 1e-5, "normalised output")
    assert S.shape == (1, 2, 8, 9)
    np.testing.assert_allclose(np.asarray(S[..., -1]), k.sum(1), rtol=1e-5)


def test_normalised_float16_survives_a_numerator_past_its_range():
    # the unnormalised numerator sum_s (q.k_s) v_s reaches ~2e6 here, past float16's 65504; the
    # ratio is ~v. The numerator must be formed in float32 for float16 inputs.
    rng = np.random.default_rng(4)
    q, k = (np.exp(0.2 * rng.standard_normal((1, 300, 1, 8))).astype(np.float16) for _ in range(2))
    v = (1000 + 100 * rng.standard_normal((1, 300, 1, 4))).astype(np.float16)
    o16, _ = linear_attention_jit(q, k, v, normalize=True, scale=1.0, impl="chunk")
    o32, _ = linear_attention_jit(*(x.astype(np.float32) for x in (q, k, v)), normalize=True,
                                  scale=1.0, impl="chunk")
    assert o16.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(o16)))
    assert_close(o16.astype(jnp.float32), o32, 2e-3, "float16 normalised output")


def test_normaliser_shares_the_numerators_products():
    """ReBased's kernel (z_q . z_k)^2 through signed compact features cancels to ~0 at some
    pairs; numerator and denominator must come from the same rounded products for the ratio's
    gradients to stay accurate. Against float64 on this draw: the column form's dq, dk 1.5e-3; z
    computed apart from the kernel (a running sum of k beside a call at V) gave 3.8e-1. In
    bfloat16 the column gives 6.6e-2 here (numerator and z rounded apart before the ratio),
    which is why the ReBased layer runs the op in float32 (`LinearAttention.float32_op`)."""
    from linear_jax.ops.feature_maps import rebased_features

    rng = np.random.default_rng(0)
    B, T, H, d, V = 2, 64, 2, 16, 8
    phi = lambda x: rebased_features(jnp.asarray(x), jnp.ones(d), jnp.zeros(d), compact=True)
    q, k = (phi(rng.standard_normal((B, T, H, d)).astype(np.float32)) for _ in range(2))
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    seg = np.cumsum(rng.uniform(size=(B, T)) < 0.1, axis=1).astype(np.int32)
    w = rng.standard_normal((B, T, H, V)).astype(np.float32)
    loss = lambda o: jnp.sum(o * w)
    dq, dk = jax.grad(lambda q, k: loss(linear_attention_jit(
        q, k, v, normalize=True, scale=1.0, segment_ids=seg, impl="chunk", chunk_size=16)[0]),
        argnums=(0, 1))(q, k)
    same = (seg[:, :, None] == seg[:, None, :]) & np.tri(T, dtype=bool)
    with jax.enable_x64(True):
        def exact(q, k):
            a = jnp.einsum("bthk,bshk->bhts", q, k) * same[:, None]
            o = jnp.einsum("bhts,bshv->bthv", a, v.astype(np.float64))
            return loss(o / (jnp.sum(a, -1).transpose(0, 2, 1)[..., None] + 1e-6))
        rq, rk = jax.grad(exact, argnums=(0, 1))(*(np.asarray(x, np.float64) for x in (q, k)))
        assert_close(dq, np.asarray(rq), 1e-2, "dq")
        assert_close(dk, np.asarray(rk), 1e-2, "dk")


@pytest.mark.parametrize("dtype,column", [(jnp.bfloat16, jnp.bfloat16),
                                          (jnp.float32, jnp.float32),
                                          (jnp.float16, jnp.float32)])
def test_normaliser_column_is_in_vs_dtype_but_float16s(monkeypatch, dtype, column):
    """bfloat16 inputs must reach the kernels as bfloat16: a float32 column made every kernel
    input float32, which the Triton kernels multiply in IEEE float32 on the CUDA cores (Based's
    MQAR step at d512 ~5 s on an H100). float16 keeps a float32 column: the unnormalised
    numerator outgrows its range (the test above)."""
    module = importlib.import_module("linear_jax.ops.linear_attention")
    seen = []

    def spy(q, k, v, g, **kw):
        seen.append(v.dtype)
        return simple_gla(q, k, v, g, **kw)
    monkeypatch.setattr(module, "simple_gla", spy)
    q, k, v = (jnp.ones((1, 5, 1, 3), dtype) for _ in range(3))
    o, _ = module.linear_attention(q, k, v, normalize=True, impl="chunk")
    assert seen == [jnp.dtype(column)] and o.dtype == dtype


def test_normalised_bfloat16_positive_kernel_against_float64():
    """Based's Taylor kernel (>= 1/2, so z never cancels) with the column in bfloat16: output and
    every gradient within bfloat16's tolerance of float64 on the same rounded inputs (measured:
    o 2.9e-3, dq 6.2e-3, dk 5.3e-3, dv 3.7e-3)."""
    from linear_jax.ops.feature_maps import taylor_features

    rng = np.random.default_rng(0)
    B, T, H, d, V = 2, 100, 2, 16, 8
    q, k = (taylor_features(jnp.asarray(rng.standard_normal((B, T, H, d)), jnp.float32),
                            compact=True).astype(jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.bfloat16)
    seg = np.cumsum(rng.uniform(size=(B, T)) < 0.05, axis=1).astype(np.int32)
    w = rng.standard_normal((B, T, H, V)).astype(np.float32)
    f = lambda q, k, v: linear_attention_jit(q, k, v, normalize=True, scale=1.0, segment_ids=seg,
                                             impl="chunk", chunk_size=16)[0]
    o = f(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)
    same = (seg[:, :, None] == seg[:, None, :]) & np.tri(T, dtype=bool)
    with jax.enable_x64(True):
        def exact(q, k, v):
            a = jnp.einsum("bthk,bshk->bhts", q, k) * same[:, None]
            o = jnp.einsum("bhts,bshv->bthv", a, v)
            return o / (jnp.sum(a, -1).transpose(0, 2, 1)[..., None] + 1e-6)
        x64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v)]
        ro = np.asarray(exact(*x64))
        rg = jax.grad(lambda *a: jnp.sum(exact(*a) * w), argnums=(0, 1, 2))(*x64)
        assert_close(o.astype(jnp.float32), ro, 1e-2, "o")
        for name, a, b in zip(("dq", "dk", "dv"), grads, rg, strict=True):
            assert_close(a.astype(jnp.float32), np.asarray(b), 1e-2, name)


def test_grouped_heads_equal_repeated_heads():
    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal((2, 20, 2, 8)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((2, 20, 6, 4)).astype(np.float32)
    g = -rng.uniform(0, 1, (2, 20, 6)).astype(np.float32)
    o, S = simple_gla_jit(q, k, v, g, impl="chunk", chunk_size=8)
    o2, S2 = simple_gla_jit(np.repeat(q, 3, 2), np.repeat(k, 3, 2), v, g, impl="recurrent")
    assert_close(o, o2, 1e-5, "grouped output")
    assert_close(S, S2, 1e-5, "grouped state")


def test_padding_never_changes_real_outputs():
    """A sequence padded at the end (its own segment id) gives the same outputs on the real part."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 40, 2, 8)).astype(np.float32) for _ in range(3))
    g = -rng.uniform(0, 1, (1, 40, 2, 8)).astype(np.float32)
    o, _ = gla_jit(q[:, :30], k[:, :30], v[:, :30], g[:, :30], impl="chunk", chunk_size=16)
    seg = np.array([[0] * 30 + [1] * 10], np.int32)
    o_pad, _ = gla_jit(q, k, v, g, segment_ids=seg, impl="chunk", chunk_size=16)
    assert_close(o_pad[:, :30], o, 1e-6, "real tokens")


def test_no_gradient_crosses_a_document_boundary():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 24, 1, 4)).astype(np.float32) for _ in range(3))
    g = -rng.uniform(0, 1, (1, 24, 1)).astype(np.float32)
    seg = np.array([[0] * 10 + [1] * 14], np.int32)
    dk = jax.jit(jax.grad(lambda k: simple_gla(q, k, v, g, segment_ids=seg, impl="chunk",
                                               chunk_size=8)[0][:, 10:].sum()))(k)
    assert np.all(np.asarray(dk)[:, :10] == 0.0)
    assert np.any(np.asarray(dk)[:, 10:] != 0.0)


def test_backward_is_deterministic():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 70, 2, 8)).astype(np.float32) for _ in range(3))
    g = -rng.uniform(0, 1, (1, 70, 2, 8)).astype(np.float32)
    f = jax.jit(jax.grad(lambda q, k, v, g: gla(q, k, v, g, impl="chunk")[0].sum(),
                         argnums=(0, 1, 2, 3)))
    a, b = f(q, k, v, g), f(q, k, v, g)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("op,gate_kind", [(simple_gla, "scalar"), (gla, "vector")],
                         ids=["simple_gla", "gla"])
def test_chunk_backward_memory_is_linear_in_T(op, gate_kind):
    """jit(grad) of the chunk path keeps chunk states, never per-step states or a [T, T] matrix."""
    B, H, K, V = 1, 1, 64, 64

    def temp_bytes(T):
        s = jax.ShapeDtypeStruct
        g = s((B, T, H) if gate_kind == "scalar" else (B, T, H, K), jnp.float32)
        args = (s((B, T, H, K), jnp.float32), s((B, T, H, K), jnp.float32),
                s((B, T, H, V), jnp.float32), g)
        loss = lambda q, k, v, g: op(q, k, v, g, impl="chunk")[0].sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    t1, t2 = temp_bytes(8192), temp_bytes(16384)
    per_step_states = 8192 * K * V * 4          # what a stored [T, K, V] would take
    assert t1 < per_step_states / 2, f"{t1 / 2**20:.1f} MiB of temporaries at T=8192"
    assert t2 < 2.1 * t1, f"grows faster than T: {t1 / 2**20:.1f} -> {t2 / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v, g: simple_gla(q[0], k, v, g), "q must have rank 4"),
        (lambda q, k, v, g: simple_gla(q, k[:, :5], v, g), "q and k"),
        (lambda q, k, v, g: simple_gla(q, k, v[:1], g), "batch size"),
        (lambda q, k, v, g: simple_gla(q, k, v[:, :, :1], g), "heads"),
        (lambda q, k, v, g: simple_gla(q, k, v, g[..., None]), "g must have rank 3"),
        (lambda q, k, v, g: simple_gla(q, k, v, g, impl="fast"), "impl"),
        (lambda q, k, v, g: simple_gla(q, k, v, -g), "log-space decays"),
        (lambda q, k, v, g: simple_gla(q, k, v, g, segment_ids=np.zeros((2, 8), np.float32)),
         "segment_ids must be an integer"),
        (lambda q, k, v, g: simple_gla(q, k, v, g, initial_state=np.zeros((2, 2, 3, 4))),
         "initial_state"),
        (lambda q, k, v, g: simple_gla(q, k, v, g, chunk_size=0), "chunk_size"),
        (lambda q, k, v, g: gla(q, k, v, g), "g must have rank 4"),
        (lambda q, k, v, g: linear_attention(q, k, v, normalize=True,
                                             initial_state=np.zeros((2, 2, 4, 3))),
         r"\[B, H, K, V \+ 1\]"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    q = k = np.ones((2, 8, 2, 4), np.float32)
    v = np.ones((2, 8, 2, 3), np.float32)
    g = -np.ones((2, 8, 2), np.float32)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, g)


@functools.cache
def _sub_chunk_inputs_and_reference():
    """Inputs of the sub-chunk test and the recurrent impl's gradients (once for every chunk)."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 100, 2, 16)).astype(np.float32) for _ in range(3))
    g = -rng.uniform(0, 1, (1, 100, 2, 16)).astype(np.float32)
    loss = lambda q, g: gla(q, k, v, g, impl="recurrent")[0].sum()
    return (q, k, v, g), jax.jit(jax.grad(loss, argnums=(0, 1)))(q, g)


@pytest.mark.parametrize("chunk_size", [8, 16, 32, 48, 64])
def test_gla_every_sub_chunk_count(chunk_size):
    """1 to 4 sub-chunks per chunk (two once crashed XLA's CPU backend in the backward pass)."""
    (q, k, v, g), want = _sub_chunk_inputs_and_reference()
    loss = lambda q, g: gla(q, k, v, g, impl="chunk", chunk_size=chunk_size)[0].sum()
    for a, b in zip(jax.jit(jax.grad(loss, argnums=(0, 1)))(q, g), want, strict=True):
        assert_close(a, b, 2e-4, "gradient")
