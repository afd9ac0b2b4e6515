"""The Hopper GLA kernels (`kernels/gpu/hopper/gla.py`) lower for CUDA, forward and backward,
checked from a CPU host: `jax.export(..., platforms=["cuda"])` runs the Pallas -> Mosaic GPU
lowering of each kernel (TMA copies, mbarriers, wgmma with SMEM and transposed operands,
register layouts) and keeps its serialized module; PTX assembly happens on the device only. Only
the default "lane" semantics: the one "warpgroup" export case of the suite is in
tests/kernels/test_hopper_lowering.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from linear_jax import ops
from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import gla as hopper_gla
from tests.kernels.lowering import cast_round_trips

# (semantics, B, T, H, K, V, packed documents + initial state, config overrides)
CASES = [
    ("lane", 2, 2048, 4, 128, 128, True, {}),        # the anchor tile sizes, two-level walks
    ("lane", 1, 200, 2, 64, 64, False, {}),          # T % 64 != 0, one value warpgroup
    ("lane", 1, 200, 2, 100, 48, True, dict(pieces=1)),   # K, V padded to 128, 64; one level
]


def _export(case, grad):
    sem, B, T, H, K, V, extras, over = case
    cfg = HopperChunkConfig(interpret=False, grad_programs=132, semantics=sem, **over)
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)                  # noqa: E731
    structs = [bf(B, T, H, K), bf(B, T, H, K), bf(B, T, H, V),
               jax.ShapeDtypeStruct((B, T, H, K), jnp.float32)]
    if extras:
        structs += [jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                    jax.ShapeDtypeStruct((B, T), jnp.int32)]

    def f(q, k, v, g, *rest):
        S0, seg = rest if rest else (None, None)
        return hopper_gla.gla(q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg,
                              chunk_size=64, config=cfg)

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    argnums = (0, 1, 2, 3) + ((4,) if extras else ())
    fn = jax.grad(loss, argnums=argnums) if grad else f
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*structs)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-T{c[2]}-K{c[4]}V{c[5]}" + "-docs" * c[6] + "".join(
        f"-{k}={v}" for k, v in c[7].items()))
def test_gla_exports_for_cuda(case, grad):
    text = _export(case, grad).mlir_module()
    names = ["gla_gates", "gla_walk"] + (["gla_walk_rev", "gla_grad"] if grad else [])
    for name in names:
        assert name in text, f"expected the Mosaic GPU kernel {name} in the module"
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


def test_variants_export_for_cuda():
    """`gla_grad_key_blocks` (the gradient kernel per key block, its tiles in two `RefUnion`s)
    at the anchor tiles, forward and backward."""
    over = dict(gla_grad_key_blocks=True)
    text = _export(("lane", 2, 2048, 4, 128, 128, True, over), True).mlir_module()
    for name in ("gla_gates", "gla_walk", "gla_walk_rev", "gla_grad"):
        assert name in text, name


def test_float32_and_wide_heads_are_refused():
    x = jnp.zeros((1, 64, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        hopper_gla.gla(x, x, x, x, scale=1.0, initial_state=None, segment_ids=None,
                       chunk_size=64)
    y = jnp.zeros((1, 64, 1, 192), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 128"):
        hopper_gla.gla(y, y, y, y.astype(jnp.float32), scale=1.0, initial_state=None,
                       segment_ids=None, chunk_size=64)


def test_op_dispatches_grouped_heads_to_the_kernel():
    """ops.gla(impl="pallas:mosaic_gpu") reaches these kernels through the registry (accepts,
    config), with grouped heads (Hk = 2 key heads for H = 4 value heads) expanded before them."""
    cfg = HopperChunkConfig(interpret=False)
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)                  # noqa: E731
    f = lambda q, k, v, g: ops.gla(q, k, v, g, impl="pallas:mosaic_gpu", config=cfg)  # noqa: E731
    text = jax.export.export(jax.jit(f), platforms=["cuda"])(
        bf(1, 200, 2, 64), bf(1, 200, 2, 64), bf(1, 200, 4, 64),
        jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.float32)).mlir_module()
    assert "gla_gates" in text and "gla_walk" in text
