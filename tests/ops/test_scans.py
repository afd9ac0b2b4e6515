"""Op-specific tests for hgrn, diagonal_scan, selective_scan, s4d_kernel / causal_conv and
short_conv (the contract suite covers the rest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.hgrn import hgrn
from linear_jax.ops.s4d import causal_conv, s4d_discretize, s4d_kernel
from linear_jax.ops.selective_scan import selective_scan
from linear_jax.ops.short_conv import short_conv
from tests.ops.spec_scans import diagonal_reference, selective_reference, short_conv_reference
from tests.utils import assert_close, rel_err, segments

IMPLS = ("recurrent", "chunk")
# jitted: op-by-op dispatch of the chunk forms costs several times their compilation (CI has 2
# cores). The bad-input tests call the ops themselves: some checks need concrete values.
hgrn_jit = jax.jit(hgrn, static_argnames=("chunk_size", "impl"))
diagonal_scan_jit = jax.jit(diagonal_scan, static_argnames=("chunk_size", "impl"))
selective_scan_jit = jax.jit(selective_scan, static_argnames=("delta_softplus", "chunk_size",
                                                               "impl"))
short_conv_jit = jax.jit(short_conv, static_argnames=("activation", "impl"))


def _ri(z):
    """Complex -> stacked real and imaginary parts (rel_err would drop the imaginary part)."""
    z = np.asarray(z)
    return np.stack([z.real, z.imag])


def test_reference_on_a_hand_computed_case():
    # h1 = 2, h2 = 0.5 * 2 + 3 = 4; a reset at t = 1 gives h2 = 3
    x = jnp.array([2.0, 3.0]).reshape(1, 2, 1)
    g = jnp.log(jnp.array([1.0, 0.5])).reshape(1, 2, 1)
    for impl in IMPLS:
        h, hT = hgrn_jit(x, g, impl=impl)
        np.testing.assert_allclose(np.asarray(h).ravel(), [2.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(hT).ravel(), [4.0], rtol=1e-6)
        h, _ = hgrn_jit(x, g, segment_ids=jnp.array([[0, 1]]), impl=impl)
        np.testing.assert_allclose(np.asarray(h).ravel(), [2.0, 3.0], rtol=1e-6)
        # a = i rotates: h1 = 1, h2 = i * 1 + 1
        h, _ = diagonal_scan_jit(jnp.full((1, 2, 1), 1j, jnp.complex64), jnp.ones((1, 2, 1)),
                                 impl=impl)
        np.testing.assert_allclose(np.asarray(h).ravel(), [1.0, 1.0 + 1.0j], rtol=1e-6)


def _complex_inputs(rng, B, T, D, radius=(0.3, 0.999)):
    a = rng.uniform(*radius, (B, T, D)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (B, T, D)))
    cn = lambda *s: rng.standard_normal(s) + 1j * rng.standard_normal(s)
    return a.astype(np.complex64), cn(B, T, D).astype(np.complex64), cn(B, D).astype(np.complex64)


def test_complex_gradients_match_finite_differences_of_the_float64_reference():
    """JAX's convention: grad of a real loss L w.r.t. z = p + iq is dL/dp - i dL/dq, so along a
    direction v the derivative is sum Re(grad * v); checked against central differences of the
    float64 recurrence, for a, x and initial_state, through the output and the final state."""
    rng = np.random.default_rng(0)
    B, T, D = 2, 23, 3
    a, x, h0 = _complex_inputs(rng, B, T, D)
    seg = segments(rng, B, T, p=0.1)
    wo, ws = _complex_inputs(rng, B, T, D)[1:]

    def loss_np(a, x, h0):
        h, hT = diagonal_reference(a, x, h0, seg)
        return np.sum((np.conj(wo) * h).real) + np.sum((np.conj(ws) * hT).real)

    dirs = [rng.standard_normal(s) + 1j * rng.standard_normal(s)
            for s in (a.shape, x.shape, h0.shape)]
    eps = 1e-6
    base = [np.asarray(v, np.complex128) for v in (a, x, h0)]
    for impl in IMPLS:
        def loss(a, x, h0):
            h, hT = diagonal_scan(a, x, initial_state=h0, segment_ids=seg, chunk_size=8, impl=impl)
            return jnp.sum(jnp.real(jnp.conj(wo) * h)) + jnp.sum(jnp.real(jnp.conj(ws) * hT))

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(a, x, h0)
        for i, name in enumerate(("a", "x", "initial_state")):
            plus, minus = list(base), list(base)
            plus[i], minus[i] = base[i] + eps * dirs[i], base[i] - eps * dirs[i]
            fd = (loss_np(*plus) - loss_np(*minus)) / (2 * eps)
            got = float(np.sum(np.real(np.asarray(grads[i]) * dirs[i])))
            assert abs(got - fd) <= 1e-4 * max(1.0, abs(fd)), (impl, name, got, fd)


def test_complex_chunk_gradients_equal_recurrent_at_unit_modulus():
    """|a| = 1 (undamped rotation, the edge of the LRU's stable range) over a long sequence with
    packed documents: finite, and chunk == recurrent in outputs and in every complex gradient."""
    rng = np.random.default_rng(1)
    B, T, D = 1, 2048, 4
    a, x, h0 = _complex_inputs(rng, B, T, D, radius=(1.0, 1.0))
    seg = segments(rng, B, T, p=0.002)
    wo = rng.standard_normal((B, T, D)).astype(np.float32)

    def loss(impl, a, x, h0):
        h, hT = diagonal_scan(a, x, initial_state=h0, segment_ids=seg, impl=impl)
        l = jnp.sum(jnp.real(h) * wo) + jnp.sum(jnp.imag(h) * wo) + jnp.sum(jnp.abs(hT) ** 2)
        return l, (h, hT)

    f = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    ((lc, outc), gc), ((_, outr), gr) = f("chunk", a, x, h0), f("recurrent", a, x, h0)
    assert np.isfinite(float(lc))
    for u, v, what in zip(outc, outr, ("output", "state"), strict=True):
        assert_close(_ri(u), _ri(v), 2e-5, what)
    for name, u, v in zip(("a", "x", "initial_state"), gc, gr, strict=True):
        assert_close(_ri(u), _ri(v), 2e-4, f"d{name}")


def test_complex_output_and_state_dtypes():
    a, x, h0 = _complex_inputs(np.random.default_rng(2), 1, 5, 2)
    bf = lambda z: z.real.astype(jnp.bfloat16)
    dtypes = lambda *args, **kw: tuple(
        o.dtype for o in jax.eval_shape(lambda *a: diagonal_scan(*a, impl="chunk", **kw), *args))
    assert dtypes(a, bf(x)) == (jnp.complex64, jnp.complex64)
    assert dtypes(a.real, x.real, initial_state=h0) == (jnp.complex64, jnp.complex64)
    assert dtypes(bf(a), bf(x)) == (jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_size_never_changes_the_result(chunk_size):
    rng = np.random.default_rng(3)
    a, x, h0 = _complex_inputs(rng, 2, 30, 3)
    seg = segments(rng, 2, 30, p=0.15)
    want = diagonal_reference(a, x, h0, seg)
    got = diagonal_scan_jit(a, x, initial_state=h0, segment_ids=seg, chunk_size=chunk_size,
                            impl="chunk")
    for u, v, what in zip(got, want, ("output", "state"), strict=True):
        assert_close(_ri(u), _ri(v), 2e-6, what)


GATES = {
    "zero": lambda rng, s: np.zeros(s, np.float32),
    "tiny": lambda rng, s: np.full(s, -1e-4, np.float32),
    "minus20": lambda rng, s: np.full(s, -20.0, np.float32),
    "uniform-20-0": lambda rng, s: rng.uniform(-20.0, 0.0, s).astype(np.float32),
    "mixed": lambda rng, s: np.where(rng.uniform(size=s) < 0.5, 0.0, -1e3).astype(np.float32),
}


@jax.jit
def _hgrn_value_and_grads(x, g, h0, seg, do):
    def loss(impl, x, g, h0):
        h, hT = hgrn(x, g, initial_state=h0, segment_ids=seg, impl=impl)
        return jnp.sum(h * do) + jnp.sum(hT)

    f = jax.value_and_grad(loss, argnums=(1, 2, 3))
    return f("chunk", x, g, h0), f("recurrent", x, g, h0)


def test_hgrn_extreme_gates_forward_and_backward():
    """T = 4096 with packed documents, for every gate kind: finite, chunk == recurrent in outputs
    and every gradient (d(g) included: products of decays have no cancellation, so the fp32
    tolerance holds at g = -20 too)."""
    rng = np.random.default_rng(4)
    B, T, D = 1, 4096, 8
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    h0 = rng.standard_normal((B, D)).astype(np.float32)
    seg = segments(rng, B, T, p=0.002)
    do = rng.standard_normal((B, T, D)).astype(np.float32)
    for gate, make in GATES.items():
        (lc, gc), (lr, gr) = _hgrn_value_and_grads(x, make(rng, (B, T, D)), h0, seg, do)
        assert np.isfinite(float(lc)), gate
        assert abs(float(lc) - float(lr)) <= 1e-4 * max(1.0, abs(float(lr))), gate
        for name, u, v in zip(("x", "g", "initial_state"), gc, gr, strict=True):
            assert np.isfinite(np.asarray(u)).all(), (gate, name)
            assert_close(u, v, 2e-4, f"{gate}: d{name}")


def test_selective_scan_strong_decay_and_long_sequence_stay_finite():
    """dt |A| up to ~1e4 (exp underflows to 0) and tiny dt, T = 2048: chunk == recurrent."""
    rng = np.random.default_rng(5)
    B, T, D, N = 1, 2048, 4, 4
    u = rng.standard_normal((B, T, D)).astype(np.float32)
    delta = np.where(rng.uniform(size=(B, T, D)) < 0.5, 1e3, 1e-4).astype(np.float32)
    A = -np.geomspace(1e-2, 10.0, D * N).reshape(D, N).astype(np.float32)
    Bm, Cm = (rng.standard_normal((B, T, N)).astype(np.float32) for _ in range(2))

    def loss(impl, u, delta, A, Bm, Cm):
        y, h = selective_scan(u, delta, A, Bm, Cm, impl=impl)
        return jnp.sum(y * u) + jnp.sum(h)

    f = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5)), static_argnums=0)
    (lc, gc), (lr, gr) = f("chunk", u, delta, A, Bm, Cm), f("recurrent", u, delta, A, Bm, Cm)
    assert np.isfinite(float(lc)) and abs(float(lc) - float(lr)) <= 1e-4 * abs(float(lr))
    for name, x, y in zip(("u", "delta", "A", "B", "C"), gc, gr, strict=True):
        assert_close(x, y, 2e-4, f"d{name}")


def test_selective_scan_groups_read_their_own_channels():
    """Grouped B/C [B,T,G,N] == running each group's D/G channels with that group's B/C."""
    rng = np.random.default_rng(6)
    B, T, D, N, G = 2, 21, 6, 3, 3
    u = rng.standard_normal((B, T, D)).astype(np.float32)
    delta = rng.uniform(0.01, 0.5, (B, T, D)).astype(np.float32)
    A = -rng.uniform(0.5, 2.0, (D, N)).astype(np.float32)
    Bm, Cm = (rng.standard_normal((B, T, G, N)).astype(np.float32) for _ in range(2))
    e = D // G
    run = jax.jit(selective_scan, static_argnames=("impl", "chunk_size"))
    for impl in IMPLS:
        y, h = run(u, delta, A, Bm, Cm, chunk_size=8, impl=impl)
        for j in range(G):
            c = slice(j * e, (j + 1) * e)
            yj, hj = run(u[..., c], delta[..., c], A[c], Bm[:, :, j], Cm[:, :, j],
                         impl="recurrent")
            assert_close(y[..., c], yj, 1e-6, f"{impl} group {j} output")
            assert_close(h[:, c], hj, 1e-6, f"{impl} group {j} state")
    # one group equals the ungrouped layout
    y1, _ = run(u, delta, A, Bm[:, :, :1], Cm[:, :, :1], impl="chunk")
    y2, _ = run(u, delta, A, Bm[:, :, 0], Cm[:, :, 0], impl="chunk")
    assert_close(y1, y2, 1e-7, "G = 1")


@pytest.mark.parametrize("impl", IMPLS)
def test_selective_scan_options_compose_as_documented(impl):
    """delta_bias and softplus act on dt, D adds u, z gates by silu: each option alone equals the
    plain scan with the documented transformation applied by hand."""
    rng = np.random.default_rng(7)
    B, T, D, N = 2, 19, 4, 3
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    u, delta, z, Bm, Cm = f(B, T, D), f(B, T, D), f(B, T, D), f(B, T, N), f(B, T, N)
    A, Dk, bias = -np.abs(f(D, N)) - 0.1, f(D), f(D)
    run = lambda *a, **k: selective_scan_jit(*a, chunk_size=8, impl=impl, **k)[0]
    dt = jax.nn.softplus(delta + bias)
    assert_close(run(u, delta, A, Bm, Cm, delta_bias=bias, delta_softplus=True),
                 run(u, dt, A, Bm, Cm), 1e-6, "bias + softplus")
    base = run(u, np.abs(delta), A, Bm, Cm)
    assert_close(run(u, np.abs(delta), A, Bm, Cm, D=Dk), base + Dk * u, 1e-6, "D")
    assert_close(run(u, np.abs(delta), A, Bm, Cm, z=z), base * jax.nn.silu(z), 1e-6, "z")
    want, _ = selective_reference(u, delta, A, Bm, Cm, Dk, z, bias, True)
    assert_close(run(u, delta, A, Bm, Cm, Dk, z, bias, True), want, 2e-5, "all options")


def test_selective_scan_chunk_backward_memory_has_no_per_step_state():
    """jit(grad) of the chunk path keeps one [D, N] state per chunk and per-chunk temporaries,
    never [T, D, N]: its temporaries grow with T by far less than D * N floats per step."""
    B, D, N = 1, 64, 16

    def temp_bytes(T):
        s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        args = (s(B, T, D), s(B, T, D), s(D, N), s(B, T, N), s(B, T, N))
        loss = lambda *a: selective_scan(*a, impl="chunk", chunk_size=16)[0].sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # (the recurrent reference grows by ~5 states per step here)
    per_step = (temp_bytes(4096) - temp_bytes(2048)) / 2048
    state_bytes = D * N * 4
    assert per_step < state_bytes / 2, f"{per_step:.0f} bytes per step, a state is {state_bytes}"


def _s4d_params(rng, D, N):
    """S4D-Lin initialisation: A = -1/2 + i pi n, log dt uniform in [log 1e-3, log 1e-1]."""
    log_dt = rng.uniform(np.log(1e-3), np.log(1e-1), D).astype(np.float32)
    A = (-0.5 + 1j * np.pi * np.arange(N))[None].repeat(D, 0).astype(np.complex64)
    Bp = (1.0 + 0.1j * rng.standard_normal((D, N))).astype(np.complex64)
    Cp = ((rng.standard_normal((D, N)) + 1j * rng.standard_normal((D, N))) / np.sqrt(2)).astype(
        np.complex64)
    return log_dt, A, Bp, Cp


def test_s4d_kernel_matches_float64_zoh():
    rng = np.random.default_rng(8)
    log_dt, A, Bp, Cp = _s4d_params(rng, 4, 8)
    L = 200
    dtA = np.exp(log_dt.astype(np.float64))[:, None] * A.astype(np.complex128)
    w = Cp * (np.exp(dtA) - 1.0) / A.astype(np.complex128) * Bp
    want = 2 * np.einsum("dn,dnl->dl", w, np.exp(dtA[..., None] * np.arange(L))).real
    got = s4d_kernel(log_dt, A, Bp, Cp, L)
    assert got.shape == (4, L) and got.dtype == jnp.float32
    assert_close(got, want, 2e-5, "kernel")
    # (real, imag) pairs and a real B give the same kernel as complex arrays
    parts = lambda z: (z.real, z.imag)
    assert_close(s4d_kernel(log_dt, parts(A), Bp.real, parts(Cp), L),
                 s4d_kernel(log_dt, A, Bp.real.astype(np.complex64), Cp, L), 1e-7, "parts")


@pytest.mark.parametrize("L", [9, 48, 80])
def test_causal_conv_matches_direct_convolution(L):
    rng = np.random.default_rng(9)
    B, T, D = 2, 48, 3
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    k = rng.standard_normal((D, L)).astype(np.float32)
    skip = rng.standard_normal(D).astype(np.float32)
    want = np.stack([np.stack([np.convolve(x[b, :, d].astype(np.float64), k[d])[:T]
                               for d in range(D)], -1) for b in range(B)]) + skip * x
    assert_close(causal_conv(x, k, skip), want, 1e-5, "fft conv")
    assert causal_conv(x.astype(jnp.bfloat16), k).dtype == jnp.bfloat16


def test_s4d_recurrence_equals_convolution():
    """The same S4D layer as a recurrence (diagonal_scan with complex a) and as a convolution
    (s4d_kernel + causal_conv): equal outputs, and equal gradients w.r.t. log_dt, A, B, C."""
    rng = np.random.default_rng(10)
    Bsz, T, D, N = 2, 96, 3, 6
    log_dt, A, Bp, Cp = _s4d_params(rng, D, N)
    u = rng.standard_normal((Bsz, T, D)).astype(np.float32)
    skip = rng.standard_normal(D).astype(np.float32)

    def conv_view(log_dt, A, Bp, Cp):
        return causal_conv(u, s4d_kernel(log_dt, A, Bp, Cp, T), skip)

    def recurrent_view(log_dt, A, Bp, Cp, impl):
        a, b = s4d_discretize(log_dt, A, Bp)                           # [D, N]
        a = jnp.broadcast_to(a.reshape(1, 1, D * N), (Bsz, T, D * N))
        x = (u[..., None] * b).reshape(Bsz, T, D * N)
        h, _ = diagonal_scan(a, x, chunk_size=16, impl=impl)
        return 2 * jnp.real(jnp.sum(h.reshape(Bsz, T, D, N) * Cp, -1)) + skip * u

    params = (log_dt, A, Bp, Cp)
    w = rng.standard_normal((Bsz, T, D)).astype(np.float32)
    grad = lambda f: jax.jit(jax.grad(lambda *p: jnp.sum(f(*p) * w), argnums=(0, 1, 2, 3)))
    y_conv, g_conv = jax.jit(conv_view)(*params), grad(conv_view)(*params)
    for impl in IMPLS:
        assert_close(jax.jit(recurrent_view, static_argnums=4)(*params, impl), y_conv, 1e-5,
                     f"{impl} output")
    view = lambda *p: recurrent_view(*p, "chunk")
    for name, x, y in zip(("log_dt", "A", "B", "C"), grad(view)(*params), g_conv, strict=True):
        assert rel_err(_ri(x), _ri(y)) <= 1e-4, (name, rel_err(_ri(x), _ri(y)))


@pytest.mark.parametrize("W", [1, 2, 4])
def test_short_conv_prefill_then_decode_equals_full(W):
    """Prefill 12 tokens (chunk), decode the rest one at a time from the returned cache (auto ->
    recurrent at T = 1), across a document boundary at t = 15 and one at the decode start."""
    rng = np.random.default_rng(11)
    B, T, D = 2, 20, 5
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    wt = rng.standard_normal((W, D)).astype(np.float32)
    seg = np.array([[0] * 15 + [1] * 5, [0] * 12 + [2] * 8], np.int32)
    y, cache = short_conv_jit(x, wt, activation="silu", segment_ids=seg, impl="chunk")
    ry, rc = short_conv_reference(x, wt, None, "silu", None, seg)
    assert_close(y, ry, 1e-6, "full")
    assert_close(cache, rc, 1e-7, "cache")
    yp, c = short_conv_jit(x[:, :12], wt, activation="silu", segment_ids=seg[:, :12], impl="chunk")
    outs = [yp]
    for t in range(12, T):
        reset = jnp.asarray(seg[:, t] != seg[:, t - 1])[:, None, None]
        c = jnp.where(reset, 0.0, c)
        yt, c = short_conv_jit(x[:, t:t + 1], wt, activation="silu", initial_state=c)
        outs.append(yt)
    assert_close(jnp.concatenate(outs, 1), y, 1e-6, "decode")
    assert_close(c, cache, 1e-7, "decoded cache")
    assert c.shape == (B, W - 1, D) and c.dtype == jnp.float32


def test_short_conv_sees_no_earlier_document():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 16, 3)).astype(np.float32)
    wt = rng.standard_normal((4, 3)).astype(np.float32)
    seg = np.array([[0] * 7 + [1] * 9], np.int32)
    for impl in IMPLS:
        dx = jax.jit(jax.grad(lambda x: short_conv(x, wt, segment_ids=seg, impl=impl)[0][
            :, 7:].sum()))(x)
        assert np.all(np.asarray(dx)[:, :7] == 0.0) and np.all(np.asarray(dx)[:, 7:] != 0.0)


def test_no_gradient_crosses_a_document_boundary():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((1, 24, 3)).astype(np.float32)
    g = -rng.uniform(0, 1, (1, 24, 3)).astype(np.float32)
    seg = np.array([[0] * 10 + [1] * 14], np.int32)
    loss = lambda x, g: hgrn(x, g, segment_ids=seg, impl="chunk", chunk_size=8)[0][:, 10:].sum()
    dx, dg = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, g)
    assert np.all(np.asarray(dx)[:, :10] == 0.0) and np.all(np.asarray(dg)[:, :11] == 0.0)
    assert np.all(np.asarray(dx)[:, 10:] != 0.0)


_x, _g = np.ones((2, 8, 4), np.float32), -np.ones((2, 8, 4), np.float32)
_u, _A, _Bm = np.ones((2, 8, 6), np.float32), -np.ones((6, 3), np.float32), np.ones((2, 8, 3),
                                                                                     np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: hgrn(_x[0], _g), "x must have rank 3"),
        (lambda: hgrn(_x, _g[:, :5]), "g must have shape"),
        (lambda: hgrn(_x, -_g), "log-space decays"),
        (lambda: hgrn(_x, _g, initial_state=np.zeros((2, 5))), "initial_state"),
        (lambda: hgrn(_x, _g, chunk_size=0), "chunk_size"),
        (lambda: hgrn(_x, _g, segment_ids=np.zeros((2, 8), np.float32)), "segment_ids"),
        (lambda: hgrn(_x, _g, impl="fast"), "impl"),
        (lambda: diagonal_scan(_g[..., :2], _x), "a must have shape"),
        (lambda: diagonal_scan(_g.astype(np.int32), _x), "a must be a floating-point or complex"),
        (lambda: diagonal_scan(_g, _x, initial_state=np.zeros((2, 4), np.int32)), "initial_state"),
        (lambda: selective_scan(_u, _u[:, :3], _A, _Bm, _Bm), "delta must have shape"),
        (lambda: selective_scan(_u, _u, _A[:4], _Bm, _Bm), "A must have shape"),
        (lambda: selective_scan(_u, _u, _A, _Bm[..., :2], _Bm), "B must have shape"),
        (lambda: selective_scan(_u, _u, _A, _Bm, np.ones((2, 8, 4, 3), np.float32)),
         "C must have shape .* G dividing D"),
        (lambda: selective_scan(_u, _u, _A, _Bm, _Bm, D=np.ones(5, np.float32)), "D must have"),
        (lambda: selective_scan(_u, _u, _A, _Bm, _Bm, z=_u[:, :2]), "z must have"),
        (lambda: selective_scan(_u, _u, _A, _Bm, _Bm, initial_state=np.zeros((2, 6, 4))),
         r"initial_state must have shape \[B, D, N\]"),
        (lambda: short_conv(_x, np.ones((4, 3), np.float32)), "weight must have shape"),
        (lambda: short_conv(_x, np.ones((4, 4), np.float32), activation="gelu"), "activation"),
        (lambda: short_conv(_x, np.ones((4, 4), np.float32), initial_state=np.zeros((2, 4, 4))),
         r"initial_state must have shape \[B, W-1, D\]"),
        (lambda: short_conv(_x, np.ones((4, 4), np.float32), bias=np.ones(3, np.float32)), "bias"),
        (lambda: s4d_kernel(np.zeros(4, np.float32), -np.ones((4, 2)), np.ones((4, 2)),
                            np.ones((4, 3)), 8), "C must have"),
        (lambda: s4d_kernel(np.zeros(4, np.float32), -np.ones((3, 2)), np.ones((4, 2)),
                            np.ones((4, 2)), 8), "A must have shape"),
        (lambda: s4d_kernel(np.zeros(4, np.float32), -np.ones((4, 2)), np.ones((4, 2)),
                            np.ones((4, 2)), 0), "L must be"),
        (lambda: causal_conv(_x, np.ones((3, 5), np.float32)), "kernel must have shape"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
