"""The sequence-parallel diagonal recurrences (`parallel.diagonal_scan`, `parallel.hgrn`) equal
their single-device ops (real and complex): outputs, final state and the gradient of every input
(initial state included), with packed documents that reset inside shards and exactly on shard
boundaries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax import ops
from linear_jax import parallel as sp
from tests.parallel.common import TOL, C, packed_segments
from tests.utils import assert_close

pytestmark = pytest.mark.timeout(300)
B, T, D = 2, 32, 8


def _close(a, b, what):
    """assert_close of the real and imaginary parts together (it compares real arrays)."""
    parts = lambda z: np.stack([np.real(z), np.imag(z)])
    assert_close(parts(a), parts(b), TOL, what)


def _draw(op, complex_=False, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    # diagonal_scan: transitions of both signs (complex: any phase); hgrn: log gates, some near 0
    if op == "hgrn":
        gate = -np.logaddexp(0, -rng.uniform(-1, 6, (B, T, D)))
    elif complex_:
        gate = rng.uniform(0.3, 1, (B, T, D)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (B, T, D)))
    else:
        gate = rng.uniform(-1, 1, (B, T, D))
    x, h0 = f(B, T, D), f(B, D)
    if complex_:
        x, h0 = x + 1j * f(B, T, D), h0 + 1j * f(B, D)
    dtype = jnp.complex64 if complex_ else jnp.float32
    return {"gate": jnp.asarray(gate, dtype), "x": jnp.asarray(x, dtype),
            "initial_state": jnp.asarray(h0, dtype)}


def _call(fn, op):
    """The op with the arguments by name, in its own argument order."""
    if op == "diagonal_scan":
        return lambda gate, x, **kw: fn(gate, x, **kw)
    return lambda gate, x, **kw: fn(x, gate, **kw)


@pytest.mark.parametrize("op,sizes,mode,complex_", [
    ("diagonal_scan", {"seq": 4}, "saved", False), ("hgrn", {"seq": 4}, "saved", False),
    ("diagonal_scan", {"seq": 2, "tensor": 2}, "rerun", False),
    ("hgrn", {"seq": 8}, "autodiff", False), ("diagonal_scan", {"seq": 4}, "saved", True)])
def test_matches_single_device(op, sizes, mode, complex_):
    """P = 2, 4, 8; the channels split over a tensor axis like heads; the three backwards;
    complex transitions, inputs and state (gradients in JAX's convention)."""
    mesh = sp.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
    x, seg = _draw(op, complex_), packed_segments(B, T)
    single = _call(getattr(ops, op), op)
    par = _call(getattr(sp, op), op)
    kw1 = dict(impl="chunk", chunk_size=C, segment_ids=seg)
    kw2 = dict(mesh=mesh, chunk_size=C, segment_ids=seg, mode=mode)
    w = jnp.sin(jnp.arange(D, dtype=jnp.float32) + 1.0)

    def loss(fn, kw):
        def f(x):
            h, S = fn(**x, **kw)
            return (jnp.sum(jnp.real(h) * w + jnp.imag(h) * w[::-1])
                    + jnp.sum(jnp.cos(jnp.real(S)) + jnp.sin(jnp.imag(S)))), (h, S)
        return f

    # the reference's outputs from its gradient's run (one compile), the parallel op's from its
    # primal alone (no residuals)
    g1, (h1, S1) = jax.jit(jax.grad(loss(single, kw1), has_aux=True))(x)
    h2, S2 = jax.jit(lambda x: par(**x, **kw2))(x)
    assert h2.dtype == h1.dtype and S2.dtype == S1.dtype
    _close(h2, h1, f"{op} output")
    _close(S2, S1, f"{op} final state")
    g2 = jax.jit(jax.grad(lambda x: loss(par, kw2)(x)[0]))(x)
    for n in x:
        _close(g2[n], g1[n], f"{op} d{n}")
