"""The sequence-parallel diagonal recurrences (`parallel.diagonal_scan`, `parallel.hgrn`) equal
their single-device ops: outputs, final state and the gradient of every input (initial state
included), with packed documents that reset inside shards and exactly on shard boundaries."""

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


def _draw(op, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    # diagonal_scan: transitions of both signs; hgrn: log gates, some near 0 (slow decay)
    gate = (rng.uniform(-1, 1, (B, T, D)) if op == "diagonal_scan"
            else -np.logaddexp(0, -rng.uniform(-1, 6, (B, T, D))))
    return {"gate": jnp.asarray(gate, jnp.float32), "x": f(B, T, D), "initial_state": f(B, D)}


def _call(fn, op):
    """The op with the arguments by name, in its own argument order."""
    if op == "diagonal_scan":
        return lambda gate, x, **kw: fn(gate, x, **kw)
    return lambda gate, x, **kw: fn(x, gate, **kw)


@pytest.mark.parametrize("op,sizes,mode", [
    ("diagonal_scan", {"seq": 4}, "saved"), ("hgrn", {"seq": 4}, "saved"),
    ("diagonal_scan", {"seq": 2, "tensor": 2}, "rerun"), ("hgrn", {"seq": 8}, "autodiff")])
def test_matches_single_device(op, sizes, mode):
    """P = 2, 4, 8; the channels split over a tensor axis like heads; the three backwards."""
    mesh = sp.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
    x, seg = _draw(op), packed_segments(B, T)
    single = _call(getattr(ops, op), op)
    par = _call(getattr(sp, op), op)
    kw1 = dict(impl="chunk", chunk_size=C, segment_ids=seg)
    kw2 = dict(mesh=mesh, chunk_size=C, segment_ids=seg, mode=mode)
    h1, S1 = jax.jit(lambda x: single(**x, **kw1))(x)
    h2, S2 = jax.jit(lambda x: par(**x, **kw2))(x)
    assert_close(h2, h1, TOL, f"{op} output")
    assert_close(S2, S1, TOL, f"{op} final state")
    w = jnp.sin(jnp.arange(D, dtype=jnp.float32) + 1.0)

    def loss(fn, kw):
        def f(x):
            h, S = fn(**x, **kw)
            return jnp.sum(h * w) + jnp.sum(jnp.cos(S))
        return f

    g1 = jax.jit(jax.grad(loss(single, kw1)))(x)
    g2 = jax.jit(jax.grad(loss(par, kw2)))(x)
    for n in x:
        assert_close(g2[n], g1[n], TOL, f"{op} d{n}")


def test_complex_raises():
    mesh = sp.make_mesh({"seq": 2}, jax.devices()[:2])
    a = jnp.full((1, 4, 2), 0.5 + 0.5j, jnp.complex64)
    with pytest.raises(ValueError, match="real inputs only"):
        sp.diagonal_scan(a, a, mesh=mesh)
