"""Every Hopper (Mosaic GPU) kernel lowers for CUDA, forward and backward, checked from a CPU host.

`jax.export(..., platforms=["cuda"])` runs the Pallas -> Mosaic GPU lowering of each `plgpu.kernel`
(TMA copies, mbarriers, wgmma, register layouts) and leaves its serialized module in the export;
PTX assembly happens on the device only. The "lane" semantics (jax 0.10's default and every
Hopper config's default) is exported at every case, forward and backward; "warpgroup" (0.11's
default) at the anchor case, forward only, the one warpgroup export of the suite: no default config
uses it, simple_gla under it failed Mosaic GPU's layout inference on the H200, and its exports
(the selective scan's backward above all) were the slowest tests of the suite. It shows the option
still reaches the lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import decay as hopper_decay
from tests.kernels.lowering import cast_round_trips

# (semantics, B, T, H, K, V, gated, packed documents + initial state, config overrides): the
# default config is two-level at every shape here (B H < the SM count), the others are variants.
# approx_math (a flag of every kernel's lowering: exp as ex2.approx) rides with gates="kernel",
# whose kernels take the most exponentials (each forms its gates from the raw log gates)
CASES = [
    ("lane", 2, 2048, 4, 128, 128, True, True, {}),      # the anchor tile sizes, 16 pieces
    ("lane", 1, 200, 2, 64, 64, True, False, {}),        # T % 64 != 0, one value warpgroup
    ("lane", 1, 200, 2, 100, 48, False, True, {}),       # no gate; K, V padded to 128, 64
    ("lane", 2, 2048, 4, 128, 128, True, True, dict(pieces=1, gates="xla", grad_items="tile")),
    ("lane", 1, 256, 2, 64, 128, True, True, dict(pieces=1, grad_items="tile")),
    ("lane", 1, 256, 2, 128, 128, True, True, dict(gates="kernel", approx_math=True)),
    ("lane", 1, 256, 2, 64, 64, False, False, dict(grad_items="split", gates="kernel")),
]
# tests/conftest.py runs a case's tests together (by its index: a case holds a dict), so
# test_warpgroup_semantics_exports_the_forward reads the anchor's "lane" forward that
# test_simple_gla_exports_for_cuda made (`_export` keeps the last two)
GROUP_BY = "i"


def _export(case, grad):
    return _export_cached(case[:-1] + (tuple(sorted(case[-1].items())),), grad)


@functools.lru_cache(maxsize=2)
def _export_cached(case, grad):
    sem, B, T, H, K, V, gated, extras, over = case[:-1] + (dict(case[-1]),)
    cfg = HopperChunkConfig(interpret=False, grad_programs=132, semantics=sem, **over)
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    structs = [bf(B, T, H, K), bf(B, T, H, K), bf(B, T, H, V)]
    structs += [jax.ShapeDtypeStruct((B, T, H), jnp.float32)] if gated else []
    n_diff = len(structs)
    if extras:
        structs += [jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                    jax.ShapeDtypeStruct((B, T), jnp.int32)]

    def f(*a):
        x, rest = list(a[:n_diff]), a[n_diff:]
        S0, seg = rest if rest else (None, None)
        g = x[3] if gated else None
        return hopper_decay.simple_gla(x[0], x[1], x[2], g, scale=K**-0.5, initial_state=S0,
                                       segment_ids=seg, chunk_size=64, config=cfg)

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    argnums = tuple(range(n_diff)) + ((n_diff,) if extras else ())
    fn = jax.grad(loss, argnums=argnums) if grad else f
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*structs)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize(
    "i", range(len(CASES)), ids=lambda i: (lambda c: f"{c[0]}-T{c[2]}-K{c[4]}V{c[5]}" + "".join(
        f"-{k}={v}" for k, v in c[8].items()))(CASES[i]))
def test_simple_gla_exports_for_cuda(i, grad):
    case = CASES[i]
    text = _export(case, grad).mlir_module()
    kernels = text.count("mosaic_gpu")
    assert kernels >= (3 if grad else 1), "expected the Mosaic GPU kernels in the module"
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


@pytest.mark.parametrize("i", [0], ids=["anchor"])
def test_warpgroup_semantics_exports_the_forward(i):
    case = CASES[i]
    lane = _export(case, grad=False).mlir_module()
    text = _export(("warpgroup",) + case[1:], grad=False).mlir_module()
    assert text.count("mosaic_gpu") >= 1, "expected the Mosaic GPU kernels in the module"
    assert text != lane, "semantics not applied"


def test_float32_and_wide_heads_are_refused():
    x = jnp.zeros((1, 64, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        hopper_decay.simple_gla(x, x, x, None, scale=1.0, initial_state=None, segment_ids=None,
                                chunk_size=64)
    y = jnp.zeros((1, 64, 1, 192), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 128"):
        hopper_decay.simple_gla(y, y, y, None, scale=1.0, initial_state=None, segment_ids=None,
                                chunk_size=64)


def test_three_stages_do_not_fit_at_128():
    cfg = HopperChunkConfig(interpret=False, stages=3, pieces=1)
    x = jax.ShapeDtypeStruct((1, 256, 1, 128), jnp.bfloat16)
    f = lambda q: hopper_decay.simple_gla(q, q, q, None, scale=1.0, initial_state=None,
                                          segment_ids=None, chunk_size=64, config=cfg)
    with pytest.raises(ValueError, match="shared memory"):
        jax.export.export(jax.jit(f), platforms=["cuda"])(x)


def test_cast_round_trip_check_sees_a_split_written_with_casts():
    """`cast_round_trips` finds the hi / lo split written with a cast round trip (which XLA's GPU
    compiler reduces to lo = 0), scalar or not, and passes `split_hi_lo_xla`'s."""
    from linear_jax.kernels.gpu.hopper.common import split_hi_lo, split_hi_lo_xla

    def exported(split, shape):
        f = jax.jit(lambda x: split(x, jnp.bfloat16))
        return jax.export.export(f, platforms=["cuda"])(
            jax.ShapeDtypeStruct(shape, jnp.float32)).mlir_module()

    for shape in ((), (64, 128)):
        assert len(cast_round_trips(exported(split_hi_lo, shape))) == 1, shape
        assert cast_round_trips(exported(split_hi_lo_xla, shape)) == [], shape
