"""The dtype the mixers hand their kernels. A bfloat16 model must reach the kernels' matrix units
in bfloat16: one float32 operand promotes every kernel input to float32, which the Triton kernels
multiply in IEEE float32 on the CUDA cores and the Mosaic GPU kernels refuse (session 33: Based's
float32 normaliser column, ~5 s an MQAR step at d512; Mamba-2's v = x * dt, whose "auto" step took
388 ms where the chunk form took 172). The exceptions are deliberate and named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from linear_jax.layers import MIXERS, make_mixer
from linear_jax.layers import linear_attention as layer_module
from linear_jax.ops import registry

# mixers whose kernels get float32 on purpose
FLOAT32 = {
    "rebased": "signed features whose products cancel: the op runs in float32 "
               "(LinearAttention.float32_op)",
    "hla": "its output a_t - b_t is a difference of two linear attentions, which cancels",
}
# mixers with no matrix-unit Triton kernel to trace: attention's softmax backends, ops without a
# Triton kernel, and the element-wise scans (hgrn, rglru, Mamba's selective scan), whose float32
# costs bandwidth, not the matrix units
NO_TRITON = ("attention", "gated_attention", "mla", "delta_product", "log_linear_mamba2",
             "log_linear_gated_deltanet", "rwkv7", "mamba3", "lte_attention", "s4d",
             "hgrn", "rglru", "mamba")


def _kernel_operands(jaxpr, out):
    """The float operands of rank >= 4 of every pallas_call in `jaxpr` (nested ones too)."""
    for eq in jaxpr.eqns:
        if eq.primitive.name == "pallas_call":
            out.append([v.aval.dtype for v in eq.invars
                        if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.ndim >= 4])
        for p in eq.params.values():
            for q in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(q, "jaxpr", q)
                if hasattr(inner, "eqns"):
                    _kernel_operands(inner, out)
    return out


@pytest.mark.parametrize("mixer", sorted(set(MIXERS) - set(NO_TRITON)))
def test_a_bfloat16_model_hands_its_kernels_bfloat16(mixer):
    options = {"feature_dim": 4} if mixer == "based" else {}       # K within the kernels' 256
    layer = make_mixer(mixer, 32, 2, rngs=nnx.Rngs(0), chunk_size=16, dtype=jnp.bfloat16,
                       impl="pallas:triton", **options)
    gdef, state = nnx.split(layer)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(gdef, s)(x))(
        state, jnp.ones((2, 32, 32), jnp.bfloat16)).jaxpr
    calls = _kernel_operands(jaxpr, [])
    assert calls, f"{mixer}: no kernel traced"
    first = {str(dtypes[0]) for dtypes in calls if dtypes}
    assert first == ({"float32"} if mixer in FLOAT32 else {"bfloat16"}), (mixer, calls)


def test_the_exceptions_are_mixers():
    assert set(FLOAT32) <= set(MIXERS) and set(NO_TRITON) <= set(MIXERS)
    assert registry.available("ssd")        # the registry is loaded: the kernels are registered


@pytest.mark.parametrize("mixer,op_dtype", [("based", jnp.bfloat16),
                                            ("linear_attention", jnp.bfloat16),
                                            ("hedgehog", jnp.bfloat16),
                                            ("rebased", jnp.float32)])
def test_normalised_linear_attention_op_dtype(monkeypatch, mixer, op_dtype):
    """The normalised linear-attention layers call their op in the model's dtype, ReBased in
    float32; the output is the model's dtype either way."""
    seen = []
    recurrence = layer_module.recurrence

    def spy(op, q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return recurrence(op, q, k, v, **kw)
    monkeypatch.setattr(layer_module, "recurrence", spy)
    layer = make_mixer(mixer, 16, 2, rngs=nnx.Rngs(0), chunk_size=8, dtype=jnp.bfloat16)
    y = layer(jnp.ones((1, 6, 16), jnp.bfloat16))
    y = y[0] if isinstance(y, tuple) else y
    assert seen == [(jnp.dtype(op_dtype),) * 3]
    assert y.dtype == jnp.bfloat16
