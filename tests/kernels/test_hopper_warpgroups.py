"""No Hopper kernel with several compute warpgroups sums across the warps of a tile.

A reduction over the rows of a wgmma-layout tile (axis 0 of a [64, N] tile, or the whole of a
row vector) crosses the four warps of a warpgroup, so the Mosaic GPU lowering routes it through
one SMEM reduction scratch shared by the whole CTA. Two compute warpgroups reducing at once then
race on that scratch: on the H200 this made simple_gla's o and dv wrong with K = V = 128 (two
value warpgroups) while K = V = 64 (one) passed, and the CPU interpreter cannot show it. This test
traces every multi-warpgroup kernel (forward and backward, K = V = 128, gates and packed documents)
and fails on any such reduction in it; a kernel with one compute warpgroup (plus its producer)
may reduce freely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src import core as jcore

from linear_jax.kernels.configs import HopperChunkConfig, HopperDeltaConfig
from linear_jax.kernels.gpu.hopper import decay as hopper_decay
from linear_jax.kernels.gpu.hopper import delta as hopper_delta
from linear_jax.kernels.gpu.hopper import gla as hopper_gla

REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin")
B, T, H, K, V = 1, 256, 2, 128, 128


def _subjaxprs(value):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for x in value:
            yield from _subjaxprs(x)


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in _subjaxprs(v):
                yield from _eqns(sub)


def cross_warp_reductions(fn, *structs) -> dict[str, list[str]]:
    """{kernel name: [offending reductions]} of every Mosaic GPU kernel traced by fn(*structs)
    with more than two threads (warpgroups), i.e. more than one compute warpgroup."""
    found = {}
    for e in _eqns(jax.make_jaxpr(fn)(*structs).jaxpr):
        if e.primitive.name != "mpmd_map":
            continue
        mesh = e.params["meshes"][0]
        found.setdefault(mesh.kernel_name, [])
        if mesh.num_threads <= 2:
            continue
        for inner in e.params["jaxprs"]:
            for r in _eqns(inner.jaxpr if isinstance(inner, jcore.ClosedJaxpr) else inner):
                if r.primitive.name not in REDUCTIONS:
                    continue
                rank, axes = r.invars[0].aval.ndim, tuple(r.params.get("axes", ()))
                if rank == 1 or any(a != rank - 1 for a in axes):
                    found[mesh.kernel_name].append(f"{r.primitive.name} axes={axes} rank={rank}")
    return found


def _structs(gate_shape):
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)      # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)      # noqa: E731
    return ([bf(B, T, H, K), bf(B, T, H, K), bf(B, T, H, V), f32(*gate_shape), f32(B, H, K, V),
             jax.ShapeDtypeStruct((B, T), jnp.int32)])


def _decay(over):
    cfg = HopperChunkConfig(interpret=False, grad_programs=132, **over)
    return (lambda q, k, v, g, S0, seg: hopper_decay.simple_gla(
        q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64,
        config=cfg)), _structs((B, T, H))


def _gla():
    cfg = HopperChunkConfig(interpret=False, grad_programs=132)
    return (lambda q, k, v, g, S0, seg: hopper_gla.gla(
        q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64,
        config=cfg)), _structs((B, T, H, K))


def _delta(gated=True, **over):
    cfg = HopperDeltaConfig(interpret=False, programs=132, **over)
    structs = _structs((B, T, H))
    structs.insert(4, jax.ShapeDtypeStruct((B, T, H), jnp.float32))       # beta
    if not gated:
        del structs[3]                                                     # no g

    def f(q, k, v, *rest):
        g, beta, S0, seg = rest if gated else (None, *rest)
        return hopper_delta.delta(q, k, v, g, beta, scale=K**-0.5, initial_state=S0,
                                  segment_ids=seg, chunk_size=64, config=cfg)
    return f, structs


KERNELS = {
    "simple_gla-xla-gates": lambda: _decay({}),
    "simple_gla-kernel-gates": lambda: _decay(dict(gates="kernel")),
    "simple_gla-kernel-gates-one-level": lambda: _decay(dict(gates="kernel", pieces=1,
                                                             grad_items="tile")),
    "gla": _gla,
    "gated_delta_rule": _delta,
    "delta_rule": lambda: _delta(False),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_no_cross_warp_reduction_with_several_warpgroups(name):
    f, structs = KERNELS[name]()
    n_float = len(structs) - 1

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    found = cross_warp_reductions(jax.grad(loss, argnums=tuple(range(n_float))), *structs)
    assert len(found) >= 3, found               # forward, reverse walk and gradient traced
    bad = {k: v for k, v in found.items() if v}
    assert not bad, bad


def test_the_check_sees_a_cross_warp_reduction():
    """The rule itself: a two-consumer kernel summing over axis 0 is reported."""
    from linear_jax._compat import mosaic_gpu_kernel

    def body(x_ref, o_ref):
        o_ref[...] = jnp.sum(x_ref[...], axis=0)

    kernel = mosaic_gpu_kernel(
        body, out_type=jax.ShapeDtypeStruct((64,), jnp.float32), grid=(1,), grid_names=("b",),
        num_threads=3, thread_name="wg", scratch_types=[], semantics="lane",
        approx_math=False, interpret=False, name="bad_sum")
    found = cross_warp_reductions(kernel, jax.ShapeDtypeStruct((64, 64), jnp.float32))
    assert found == {"bad_sum": ["reduce_sum axes=(0,) rank=2"]}
