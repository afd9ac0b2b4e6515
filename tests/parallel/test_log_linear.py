"""Sequence-parallel log-linear simple GLA and Gated DeltaNet equal their single-device ops:
outputs, final state (levels and position) and the gradient of every float input (initial levels
included), with packed documents resetting inside shards and exactly on shard boundaries, and an
initial state whose position continues the first document. (The layers: test_mixers.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from linear_jax import _compat, ops
from linear_jax import parallel as sp
from linear_jax.ops.common import fenwick
from linear_jax.ops.common.fenwick import FenwickState
from tests.parallel.common import TOL, H, K, V, packed_segments
from tests.utils import assert_close

pytestmark = pytest.mark.timeout(300)
T, L, C = 32, 5, 4
P0 = jnp.asarray([3.0, 0.0])    # the first document continues a state at position 3


def _draw(op, B, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    x = {"q": f(B, T, H, K), "k": f(B, T, H, K), "v": f(B, T, H, V),
         "g": -jax.nn.softplus(f(B, T, H)), "level_weights": jax.nn.softplus(f(B, T, H, L)),
         "levels": f(B, H, L, K, V)}
    if op == "log_linear_gated_delta_rule":
        x["k"] = x["k"] / jnp.linalg.norm(x["k"], axis=-1, keepdims=True)
        x["beta"] = jax.nn.sigmoid(f(B, T, H)) * 2.0
    return x


def _outputs_and_grads(fn):
    """jit(x, seg) -> ((o, final state), d loss / d x): one compile per function."""
    w = jnp.sin(jnp.arange(V, dtype=jnp.float32) + 1.0)

    def loss(x, seg):
        x = dict(x)
        state = FenwickState(x.pop("levels"), P0)
        o, S = fn(**x, initial_state=state, segment_ids=seg)
        return jnp.sum(o * w) + jnp.sum(jnp.cos(S.levels)), (o, S)
    return jax.jit(lambda x, seg: jax.grad(loss, has_aux=True)(x, seg)[::-1])


@functools.cache
def _single(op):
    return _outputs_and_grads(lambda **a: getattr(ops, op)(**a, impl="chunk", chunk_size=C))


def _in_shard_map(mesh, mode):
    """The local form inside a user's `shard_map`, positions from the global segment ids."""
    x_spec, seg_spec, state_spec = sp.mesh.specs(mesh)

    def run(q, k, v, g, level_weights, initial_state, segment_ids):
        levels, p0 = initial_state
        pos = fenwick.positions(p0.astype(jnp.int32), segment_ids, *segment_ids.shape)

        def body(q, k, v, g, lam, levels, pos, seg):
            o, S = sp.log_linear_simple_gla(q, k, v, g, lam, initial_state=(levels, None),
                                            segment_ids=seg, positions=pos, chunk_size=C,
                                            mode=mode)
            return o, S.levels, S.position

        in_specs = (x_spec,) * 5 + (state_spec, seg_spec, seg_spec)
        f = _compat.shard_map(body, mesh=mesh, in_specs=in_specs,
                              out_specs=(x_spec, state_spec, PartitionSpec()))
        o, S, p = f(q, k, v, g, level_weights, levels, pos, segment_ids)
        return o, FenwickState(S, p)
    return run


@pytest.mark.parametrize("op,local,mode", [("log_linear_simple_gla", False, "saved"),
                                           ("log_linear_simple_gla", True, "rerun"),
                                           ("log_linear_gated_delta_rule", False, "saved")])
def test_matches_single_device(op, local, mode):
    mesh = _compat.make_mesh((4,), ("seq",), jax.devices()[:4])
    x, seg = _draw(op, 2), packed_segments(2, T)
    par = _in_shard_map(mesh, mode) if local else (
        lambda **a: getattr(sp, op)(**a, mesh=mesh, chunk_size=C, mode=mode))
    ((o1, S1), g1), ((o2, S2), g2) = _single(op)(x, seg), _outputs_and_grads(par)(x, seg)
    assert_close(o2, o1, TOL, "output")
    assert_close(S2.levels, S1.levels, TOL, "final levels")
    np.testing.assert_array_equal(S2.position, S1.position)
    for n in x:
        assert_close(g2[n], g1[n], TOL, f"d{n}")
