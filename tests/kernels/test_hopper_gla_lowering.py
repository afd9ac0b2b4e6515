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

# (semantics, B, T, H, K, V, packed documents + initial state, config overrides). The gradient
# kernel: per 64-key block (`gla_grad_key_blocks`, the default: a CTA per key block, its tiles in
# two `RefUnion`s) at the anchor, the fused kernel walking its key blocks at K = 64 (one block) and
# at K = 100 (padded to two blocks: the loop over them)
CASES = [
    ("lane", 2, 2048, 4, 128, 128, True, {}),        # the anchor tile sizes, two-level walks
    ("lane", 1, 200, 2, 64, 64, False, {}),          # T % 64 != 0, one value warpgroup
    ("lane", 1, 200, 2, 100, 48, True,               # K, V padded to 128, 64; one level
     dict(pieces=1, gla_grad_key_blocks=False)),
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


def _id(case, grad):
    return f"{case[0]}-T{case[2]}-K{case[4]}V{case[5]}" + "-docs" * case[6] + "".join(
        f"-{k}={v}" for k, v in case[7].items()) + ("-bwd" if grad else "-fwd")


# every case forward and backward, but CASES[1]'s forward: its kernels (K = 64, no documents, four
# pieces) are test_op_dispatches_grouped_heads_to_the_kernel's export, at H = 4 instead of 2
PAIRS = [(c, g) for c in CASES for g in (False, True) if (c, g) != (CASES[1], False)]


@pytest.mark.parametrize("case, grad", PAIRS, ids=[_id(*p) for p in PAIRS])
def test_gla_exports_for_cuda(case, grad):
    text = _export(case, grad).mlir_module()
    names = ["gla_gates", "gla_walk"] + (["gla_walk_rev", "gla_grad"] if grad else [])
    for name in names:
        assert name in text, f"expected the Mosaic GPU kernel {name} in the module"
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


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
    config), with grouped heads (Hk = 2 key heads for H = 4 value heads) expanded before them.
    Also the forward export of CASES[1]'s shape (test_gla_exports_for_cuda leaves it here)."""
    cfg = HopperChunkConfig(interpret=False)
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)                  # noqa: E731
    f = lambda q, k, v, g: ops.gla(q, k, v, g, impl="pallas:mosaic_gpu", config=cfg)  # noqa: E731
    text = jax.export.export(jax.jit(f), platforms=["cuda"])(
        bf(1, 200, 2, 64), bf(1, 200, 2, 64), bf(1, 200, 4, 64),
        jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.float32)).mlir_module()
    assert "gla_gates" in text and "gla_walk" in text
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"
