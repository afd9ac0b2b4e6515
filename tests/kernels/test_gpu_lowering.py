"""Every GPU kernel lowers through Pallas' Triton path, checked on a CPU host.

`jax.export(..., platforms=["cuda"])` runs the Pallas-to-Triton-IR lowering without a GPU (the
kernels' configs say interpret=False): a kernel that uses an operation Triton cannot express (a
value slice, a non power-of-two load, a concatenate) fails here, in CI, instead of on the device.
Every kernel of the decay family and the delta rule (KDA's vector gate included), in both forward
forms, forward alone and
under jax.grad, at two shapes: bf16 K = V = 128 (the benchmark shape) and float32 K = 48, V = 96
(padded inside the entry), with packed documents and an initial state. mLSTM's are in
test_gpu_mlstm.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import decay, delta
from tests.kernels.lowering import cast_round_trips, triton_kernels

TRITON = "__gpu$xla.gpu.triton"
SHAPES = [(jnp.bfloat16, 1, 200, 128, 128), (jnp.float32, 2, 100, 48, 96)]
CASES = [(gate,) + shape for gate in ("none", "scalar", "vector", "delta", "gated_delta", "kda")
         for shape in SHAPES]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"{c[0]}-{jnp.dtype(c[1]).name}-T{c[3]}-{c[4]}x{c[5]}")
def test_lowers_to_triton(case, fused):
    _lowers(case, fused)


@pytest.mark.parametrize("gate", ["none", "vector", "gated_delta", "kda"])
def test_float32_tf32x3_lowers(gate):
    """`f32_dots="tf32x3"`: every kernel of the forward and backward lowers for float32 inputs
    with its products as 3xTF32 (Triton's tf32x3 dots take float32 operands only)."""
    _lowers((gate,) + SHAPES[1], False, f32_dots="tf32x3")


def _lowers(case, fused, **config):
    gate, dtype, B, T, K, V = case
    H = 2
    sds = jax.ShapeDtypeStruct
    vector = sds((B, T, H, K), jnp.float32)
    g = {"none": None, "scalar": sds((B, T, H), jnp.float32), "delta": None,
         "gated_delta": sds((B, T, H), jnp.float32), "vector": vector, "kda": vector}[gate]
    is_delta = "delta" in gate or gate == "kda"
    args = (sds((B, T, H, K), dtype), sds((B, T, H, K), dtype), sds((B, T, H, V), dtype), g,
            sds((B, H, K, V), jnp.float32), sds((B, T), jnp.int32), sds((B, T, H), dtype))

    def loss(q, k, v, g, S0, seg, beta):
        kw = dict(scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64,
                  config=TritonChunkConfig(fused_fwd=fused, interpret=False, **config))
        if is_delta:
            o, S = delta.delta(q, k, v, g, beta, **kw)
        else:
            o, S = decay.decay(q, k, v, g, **kw)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    argnums = ((0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)) + ((6,) if is_delta else ())
    lower = lambda f: export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()
    text = lower(jax.value_and_grad(loss, argnums=argnums))
    primal = lower(loss)                         # the forward alone keeps no residuals
    fwd = [f"{gate}_fused_fwd"] if fused else ["decay_state_fwd", "decay_output"]
    names = fwd + ["decay_state_bwd", "decay_backward"]
    if is_delta:
        fwd = ([f"{gate}_fused_fwd"] if fused else
               ["delta_ut_apply", "delta_state_fwd", "decay_output"])
        names = ["delta_ut_inverse"] + fwd + ["delta_state_bwd", "delta_backward_states",
                                              "delta_backward_wy"]
    for name in fwd:
        assert f'name = "{name}"' in primal, name
    if gate in ("vector", "kda"):
        names += ["gla_intra_forward", "gla_intra_backward"]
    for name in names:
        assert f'name = "{name}"' in text, name
    assert "num_warps" in text
    for module in (text, primal):
        assert not cast_round_trips(module), "a float32 -> 16-bit -> float32 cast in XLA"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: jnp.dtype(s[0]).name)
def test_kda_kernels_have_no_boolean_tile(shape):
    """KDA's T = (I + L)^-1 kernel and its reverse state pass build their tensor-core operands
    without a boolean tile (`tiles.unit_lower_inverse(float_masks=True)`, `tiles.doc_factors`):
    L and the gate factors [C, K] are elementwise in loaded tiles, so on Hopper Triton may move
    the products' operand layout up through the masks and stage them in shared memory, which
    fails for i1 ("'ttg.local_alloc' op element type bit width must be a multiple of 8", bf16 on
    an H200; `kernel_bisect` found the reverse pass after the inverse was fixed). With packed
    documents and an initial state, under jax.grad."""
    dtype, B, T, K, V = shape
    H = 2
    sds = jax.ShapeDtypeStruct
    args = (sds((B, T, H, K), dtype), sds((B, T, H, K), dtype), sds((B, T, H, V), dtype),
            sds((B, T, H, K), jnp.float32), sds((B, T, H), dtype), sds((B, H, K, V), jnp.float32),
            sds((B, T), jnp.int32))

    def loss(q, k, v, g, beta, S0, seg):
        o, S = delta.delta(q, k, v, g, beta, scale=K**-0.5, initial_state=S0, segment_ids=seg,
                           chunk_size=64, config=TritonChunkConfig(interpret=False))
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    text = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(
        *args).mlir_module()
    kernels = [(name, ir) for name, ir in triton_kernels(text)
               if name in ("delta_ut_inverse", "delta_state_bwd")]
    assert {name for name, _ in kernels} == {"delta_ut_inverse", "delta_state_bwd"}
    for name, ir in kernels:
        assert "xi1>" not in ir, name   # no boolean tensor (scalar i1 from index math is fine)


@pytest.mark.parametrize("over", [dict(), dict(gla_bwd="rows"), dict(dv_pass="loop"),
                                  dict(gla_bwd="fold", dv_pass="loop", gla_diag="loop",
                                       block_k_intra=128)], ids=["default", "rows", "dv1", "old"])
@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_backward_variants_lower(gate, over):
    """The backward's structures (`TritonChunkConfig.gla_bwd` "fold", the default, and "rows";
    `dv_pass="loop"`) lower to Triton, with packed documents and an initial state at the
    benchmark's bf16 shape; "fold" writes one float32 dg part, "rows" two."""
    dtype, B, T, K, V = SHAPES[0]
    H = 2
    sds = jax.ShapeDtypeStruct
    g = sds((B, T, H) + ((K,) if gate == "vector" else ()), jnp.float32)
    args = (sds((B, T, H, K), dtype), sds((B, T, H, K), dtype), sds((B, T, H, V), dtype), g,
            sds((B, H, K, V), jnp.float32), sds((B, T), jnp.int32))

    def loss(q, k, v, g, S0, seg):
        o, S = decay.decay(q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg,
                           chunk_size=64, config=TritonChunkConfig(interpret=False, **over))
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    text = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(
        *args).mlir_module()
    kernels = dict(triton_kernels(text))
    assert {"decay_state_fwd", "decay_state_bwd", "decay_backward"} <= set(kernels)
    if gate == "vector":
        assert {"gla_intra_forward", "gla_intra_backward"} <= set(kernels)
        stores = kernels["decay_backward"].count('"tt.store"')
        f32_tiles = kernels["decay_backward"].count("tensor<64x128xf32>) -> ()")
        assert stores and f32_tiles == (4 if over.get("gla_bwd") == "rows" else 3), f32_tiles
