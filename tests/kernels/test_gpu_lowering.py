"""Every GPU kernel lowers through Pallas' Triton path, checked on a CPU host.

`jax.export(..., platforms=["cuda"])` runs the Pallas-to-Triton-IR lowering without a GPU (the
kernels' configs say interpret=False): a kernel that uses an operation Triton cannot express (a
value slice, a non power-of-two load, a concatenate) fails here, in CI, instead of on the device.
Every kernel of the decay family and the delta rule (KDA's vector gate included), in both forward
forms, forward alone and under jax.grad, at two shapes: bf16 K = V = 128 (the benchmark shape) and
float32 K = 48, V = 96 (padded inside the entry), with packed documents and an initial state.
Each gate lowers at both shapes (its backward kernels at both) and in both forms; the two forms
alternate between the shapes so that every gate kind (none, scalar, vector), every family (decay,
delta) and every dtype meets each form (`CASES`). mLSTM's are in test_gpu_mlstm.py.
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
BF16, F32 = SHAPES
# (gate, shape, fused): each gate at both shapes (its backward kernels, which both forms share,
# at both), one form at each. The form flips with the shape and between neighbouring gates, so
# each gate kind (none: none / delta; scalar: scalar / gated_delta; vector: vector / kda) and each
# family (decay: none, scalar, vector; delta: delta, gated_delta, kda) lowers its one-pass and its
# two-pass forward at both shapes. The full product (24 exports) added only a gate's own forward
# kernel at its other dtype, whose dtype-dependent code (`Ctx.f32`'s products, the 16-bit
# operands and stored residuals) is shared by the kind or the family and lowered here at it.
CASES = [("none", BF16, True), ("none", F32, False), ("scalar", BF16, False),
         ("scalar", F32, True), ("vector", BF16, True), ("vector", F32, False),
         ("delta", BF16, False), ("delta", F32, True), ("gated_delta", BF16, True),
         ("gated_delta", F32, False), ("kda", BF16, False), ("kda", F32, True)]


@pytest.mark.parametrize("gate, shape, fused", CASES, ids=[
    f"{g}-{jnp.dtype(s[0]).name}-T{s[2]}-{s[3]}x{s[4]}-{'fused' if f else 'two_pass'}"
    for g, s, f in CASES])
def test_lowers_to_triton(gate, shape, fused):
    """Also, for kda, no boolean tile in two of its kernels (`_no_boolean_tile`), and for the
    vector gate at K = 128 the default backward's ("fold") float32 tiles (as
    `test_backward_variants_lower`)."""
    _lowers((gate,) + shape, fused)


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
    if config:
        return
    if gate == "kda":
        _no_boolean_tile(text)
    if gate == "vector" and K == 128:       # test_backward_variants_lower's default
        _fold_tiles(dict(triton_kernels(text)), {})


def _no_boolean_tile(text):
    """KDA's T = (I + L)^-1 kernel and its reverse state pass build their tensor-core operands
    without a boolean tile (`tiles.unit_lower_inverse(float_masks=True)`, `tiles.doc_factors`):
    L and the gate factors [C, K] are elementwise in loaded tiles, so on Hopper Triton may move
    the products' operand layout up through the masks and stage them in shared memory, which
    fails for i1 ("'ttg.local_alloc' op element type bit width must be a multiple of 8", bf16 on
    an H200; `kernel_bisect` found the reverse pass after the inverse was fixed). Checked on the
    gradient's module of both kda cases of `test_lowers_to_triton` (bf16 and float32, packed
    documents and an initial state; once a test of its own, which exported the same module)."""
    kernels = [(name, ir) for name, ir in triton_kernels(text)
               if name in ("delta_ut_inverse", "delta_state_bwd")]
    assert {name for name, _ in kernels} == {"delta_ut_inverse", "delta_state_bwd"}
    for name, ir in kernels:
        assert "xi1>" not in ir, name   # no boolean tensor (scalar i1 from index math is fine)


def _fold_tiles(kernels, over):
    """The vector gate's backward kernel at K = 128: "fold" writes one float32 dg part, "rows"
    two."""
    stores = kernels["decay_backward"].count('"tt.store"')
    f32_tiles = kernels["decay_backward"].count("tensor<64x128xf32>) -> ()")
    assert stores and f32_tiles == (4 if over.get("gla_bwd") == "rows" else 3), f32_tiles


# the default config's backward at this shape is test_lowers_to_triton's (scalar: bf16 two-pass,
# its kernels checked there; vector: bf16, `_fold_tiles` there). gla_bwd, gla_diag and
# block_k_intra reach only the vector gate's kernels (`decay._backward_main`: rows_out, fold are
# `vec and ...`; the intra kernels): the scalar gate's "rows" was its default and its "old" its
# "dv1", kernel for kernel, so it runs "dv1" alone; the vector gate's "dv1" was "old"'s
# decay_backward (fold, dv in the value loop) with the default's intra kernels.
VARIANTS = [("scalar", "dv1"), ("vector", "rows"), ("vector", "old")]
OVER = {"rows": dict(gla_bwd="rows"), "dv1": dict(dv_pass="loop"),
        "old": dict(gla_bwd="fold", dv_pass="loop", gla_diag="loop", block_k_intra=128)}


@pytest.mark.parametrize("gate, variant", VARIANTS, ids=[f"{g}-{v}" for g, v in VARIANTS])
def test_backward_variants_lower(gate, variant):
    """The backward's structures (`TritonChunkConfig.gla_bwd` "fold", the default, and "rows";
    `dv_pass="loop"`) lower to Triton, with packed documents and an initial state at the
    benchmark's bf16 shape; "fold" writes one float32 dg part, "rows" two."""
    over = OVER[variant]
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
        _fold_tiles(kernels, over)
