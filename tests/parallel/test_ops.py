"""Every sequence-parallel op equals the single-device op: outputs, final state and gradients of
every float input, initial state included, with packed documents that reset inside shards and
exactly on shard boundaries. Meshes are subsets of the 8 simulated host devices (conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from linear_jax import _compat, ops
from linear_jax import parallel as sp
from tests.parallel.common import SINGLE, C, compare, draw, packed_segments
from tests.utils import assert_close

pytestmark = pytest.mark.timeout(300)
T = 64
# tests/conftest.py runs an op's tests together (pytest-xdist hands a worker consecutive tests):
# they share the single-device reference's compilations (tests/parallel/common.py)
GROUP_BY = "op"


def mesh_of(shape, names):
    return sp.make_mesh(dict(zip(names, shape, strict=True)), jax.devices()[:int(np.prod(shape))])


# P in {2, 4, 8} across the kinds of shard map (scalar, vector, matrix); the other tests add P = 4
CASES = [("simple_gla", 2), ("simple_gla", 8), ("gla", 8), ("gated_delta_rule", 2),
         ("gated_delta_rule", 4), ("gated_delta_rule", 8), ("linear_attention", 4),
         ("delta_rule", 2)]


@pytest.mark.parametrize("op,P", CASES, ids=[f"{o}-P{p}" for o, p in CASES])
def test_matches_single_device(op, P):
    compare(op, mesh_of((P,), ("seq",)), draw(op, 2, T), packed_segments(2, T))


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule"])
def test_extreme_gates_and_betas(op):
    """g in {0, -30} (a decay that underflows inside a shard and whole shards that forget),
    beta in {0, 2} (no write; a reflection)."""
    compare(op, mesh_of((4,), ("seq",)), draw(op, 2, T, seed=1, extreme=True), None)


@pytest.mark.parametrize("op,mode,staging", [
    ("simple_gla", "rerun", "auto"), ("gla", "autodiff", "auto"), ("gla", "saved", "gemm"),
    ("gated_delta_rule", "rerun", "auto"), ("delta_rule", "autodiff", "auto")])
def test_modes_and_stagings(op, mode, staging):
    kw = {"mode": mode} if op in ("delta_rule", "gated_delta_rule") else {
        "mode": mode, "staging": staging}
    compare(op, mesh_of((2,), ("seq",)), draw(op, 2, T, seed=2), packed_segments(2, T), **kw)


@pytest.mark.parametrize("op,shape,names", [
    ("simple_gla", (2, 4), ("data", "seq")),
    ("gated_delta_rule", (2, 2, 2), ("data", "seq", "tensor"))])
def test_batch_and_heads_sharded(op, shape, names):
    """B = 2 on a 2-D (data, seq) mesh; heads on a third (tensor) axis."""
    compare(op, mesh_of(shape, names), draw(op, 2, T, seed=3), packed_segments(2, T))


def test_grouped_heads_normalized_attention_and_no_initial_state():
    x = draw("simple_gla", 2, T, seed=4, Hk=1)
    compare("simple_gla", mesh_of((4,), ("seq",)), x, packed_segments(2, T))
    x = draw("linear_attention", 2, T, seed=5)
    x["initial_state"] = jnp.abs(jnp.concatenate(
        [x["initial_state"], jnp.ones(x["initial_state"].shape[:-1] + (1,))], -1))
    x["k"] = jnp.abs(x["k"])
    compare("linear_attention", mesh_of((4,), ("seq",)), x, None, op_kw={"normalize": True})
    x = draw("gla", 2, T, seed=6)
    del x["initial_state"]
    compare("gla", mesh_of((4,), ("seq",)), x, packed_segments(2, T))


def test_no_initial_state_on_a_batch_sharded_mesh():
    """The zero initial state is split like the batch, so its cotangent types check (regression)."""
    x = draw("gated_delta_rule", 2, T, seed=7)
    del x["initial_state"]
    compare("gated_delta_rule", mesh_of((2, 2), ("data", "seq")), x, packed_segments(2, T))


def test_bf16_inputs():
    x = draw("gated_delta_rule", 2, T, seed=7, dtype=jnp.bfloat16)
    seg = packed_segments(2, T)
    mesh = mesh_of((4,), ("seq",))
    o1, S1 = jax.jit(lambda x: SINGLE["gated_delta_rule"](**x, segment_ids=seg, chunk_size=C,
                                                          impl="chunk"))(x)
    o2, S2 = jax.jit(lambda x: sp.gated_delta_rule(**x, segment_ids=seg, chunk_size=C,
                                                   mesh=mesh))(x)
    assert o2.dtype == jnp.bfloat16 and S2.dtype == jnp.float32
    assert_close(o2, o1, 2e-2, "bf16 output")
    assert_close(S2, S1, 1e-2, "bf16 final state")


@pytest.mark.parametrize("check", [True, False])
def test_inside_a_user_shard_map(check):
    """The local API inside a hand-written shard_map, with and without vma checking (without it,
    the initial state's cotangent must come from shard 0 alone: shard_map sums it)."""
    mesh = mesh_of((4,), ("seq",))
    x, seg = draw("gla", 2, T, seed=8), packed_segments(2, T)

    def local(q, k, v, g, S0, seg):
        return sp.gla(q, k, v, g, initial_state=S0, segment_ids=seg, chunk_size=C,
                      axis_name="seq")

    f = _compat.shard_map(local, mesh=mesh, check=check,
                          in_specs=(P(None, "seq"),) * 4 + (P(), P(None, "seq")),
                          out_specs=(P(None, "seq"), P()))
    args = (x["q"], x["k"], x["v"], x["g"], x["initial_state"], seg)
    loss = lambda f: lambda *a: jnp.sum(f(*a, seg)[0] ** 2) + jnp.sum(f(*a, seg)[1])
    ref = lambda q, k, v, g, S0, seg: SINGLE["gla"](q, k, v, g, initial_state=S0, segment_ids=seg,
                                                    chunk_size=C, impl="chunk")
    for a, b in zip(jax.jit(f)(*args), jax.jit(ref)(*args), strict=True):
        assert_close(a, b, 2e-5, "forward")
    g1 = jax.jit(jax.grad(loss(ref), argnums=range(5)))(*args[:5])
    g2 = jax.jit(jax.grad(loss(f), argnums=range(5)))(*args[:5])
    for n, a, b in zip("qkvgS", g2, g1, strict=True):
        assert_close(a, b, 2e-5, f"d{n}")


def test_bad_arguments():
    mesh = mesh_of((4,), ("seq",))
    x = draw("simple_gla", 1, 62)
    with pytest.raises(ValueError, match="multiple of the size 4"):
        sp.simple_gla(**x, mesh=mesh)
    with pytest.raises(ValueError, match="no axis 'seq'"):
        sp.simple_gla(**draw("simple_gla", 1, T), mesh=mesh_of((4,), ("sp",)))
    with pytest.raises(ValueError, match="mode must be one of"):
        sp.simple_gla(**draw("simple_gla", 1, T), mesh=mesh, mode="fast")
    with pytest.raises(ValueError, match="staging='zeco' needs the chunk form"):
        sp.simple_gla(**draw("simple_gla", 1, T), mesh=mesh, impl="recurrent", staging="zeco")


def test_ssd():
    rng = np.random.default_rng(9)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    Hs, G, N, Pd = 4, 2, 8, 8
    x, dt, Bm, Cm = f(2, T, Hs, Pd), f(2, T, Hs), f(2, T, G, N), f(2, T, G, N)
    A, D, bias, h0 = -jnp.exp(f(Hs)), f(Hs), f(Hs), f(2, Hs, N, Pd)
    seg = packed_segments(2, T)
    mesh = mesh_of((4,), ("seq",))
    ref = lambda x, dt, Bm, Cm, h0: ops.ssd(x, dt, A, Bm, Cm, D, bias, initial_state=h0,
                                            segment_ids=seg, chunk_size=C, impl="chunk")
    par = lambda x, dt, Bm, Cm, h0: sp.ssd(x, dt, A, Bm, Cm, D, bias, initial_state=h0,
                                           segment_ids=seg, chunk_size=C, mesh=mesh)
    args = (x, dt, Bm, Cm, h0)
    for a, b in zip(jax.jit(par)(*args), jax.jit(ref)(*args), strict=True):
        assert_close(a, b, 2e-5, "ssd forward")
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)[0])) + jnp.sum(fn(*a)[1] ** 2)
    g1 = jax.jit(jax.grad(loss(ref), argnums=range(5)))(*args)
    g2 = jax.jit(jax.grad(loss(par), argnums=range(5)))(*args)
    for n, a, b in zip(["x", "dt", "B", "C", "h0"], g2, g1, strict=True):
        assert_close(a, b, 2e-5, f"ssd d{n}")


@pytest.mark.parametrize("op", ["simple_gla", "gated_delta_rule"])
def test_pallas_kernels_in_interpret_mode(op):
    """impl= reaches the registered kernels (interpret mode on CPU); the mesh wrapper turns the
    vma check off for them."""
    compare(op, mesh_of((2,), ("seq",)), draw(op, 1, T, seed=10), packed_segments(1, T),
            tol=1e-4, impl="pallas")
