"""Every GPU kernel lowers through Pallas' Triton path, checked on a CPU host.

`jax.export(..., platforms=["cuda"])` runs the Pallas-to-Triton-IR lowering without a GPU: a kernel
that uses an operation Triton cannot express (a value slice, a non power-of-two load, a concatenate)
fails here, in CI, instead of on the device. Forward and backward, bf16 and float32, K = V = 128
(the benchmark shape) and K = 48, V = 96 (padded inside the op).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export
from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import decay, delta

TRITON = "__gpu$xla.gpu.triton"
CASES = [("none", jnp.bfloat16, 128, 128), ("scalar", jnp.bfloat16, 128, 128),
         ("vector", jnp.bfloat16, 128, 128), ("vector", jnp.float32, 48, 96),
         ("scalar", jnp.float32, 48, 96), ("delta", jnp.bfloat16, 128, 128),
         ("gated_delta", jnp.float32, 48, 96)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"{c[0]}-{jnp.dtype(c[1]).name}-{c[2]}x{c[3]}")
def test_lowers_to_triton(case, fused):
    gate, dtype, K, V = case
    B, T, H = 1, 200, 2
    sds = jax.ShapeDtypeStruct
    g = {"none": None, "scalar": sds((B, T, H), jnp.float32), "delta": None,
         "gated_delta": sds((B, T, H), jnp.float32), "vector": sds((B, T, H, K), jnp.float32)}[gate]
    args = (sds((B, T, H, K), dtype), sds((B, T, H, K), dtype), sds((B, T, H, V), dtype), g,
            sds((B, H, K, V), jnp.float32), sds((B, T), jnp.int32), sds((B, T, H), dtype))

    def loss(q, k, v, g, S0, seg, beta):
        kw = dict(scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64,
                  config=TritonChunkConfig(fused_fwd=fused, interpret=False))
        if "delta" in gate:
            o, S = delta.delta(q, k, v, g, beta, **kw)
        else:
            o, S = decay.decay(q, k, v, g, **kw)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    argnums = ((0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)) + ((6,) if "delta" in gate else ())
    lower = lambda f: export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()
    text = lower(jax.value_and_grad(loss, argnums=argnums))
    primal = lower(loss)                         # the forward alone keeps no residuals
    fwd = [f"{gate}_fused_fwd"] if fused else ["decay_state_fwd", "decay_output"]
    names = fwd + ["decay_state_bwd", "decay_backward"]
    if "delta" in gate:
        fwd = ([f"{gate}_fused_fwd"] if fused else
               ["delta_ut_apply", "delta_state_fwd", "decay_output"])
        names = ["delta_ut_inverse"] + fwd + ["delta_state_bwd", "delta_backward_states",
                                              "delta_backward_wy"]
    for name in fwd:
        assert f'name = "{name}"' in primal, name
    if gate == "vector":
        names += ["gla_intra_forward", "gla_intra_backward"]
    for name in names:
        assert f'name = "{name}"' in text, name
    assert "num_warps" in text
