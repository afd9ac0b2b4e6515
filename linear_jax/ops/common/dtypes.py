"""The dtype of values an op forms itself before handing them to its kernels."""

from __future__ import annotations

import jax.numpy as jnp


def kernel_values_dtype(dtype):
    """`dtype`, or float32 for float16, whose range unnormalised sums outgrow. Never float32 for
    bfloat16: one float32 operand promotes every kernel input to float32, which the Triton kernels
    multiply in IEEE float32 on the CUDA cores and the Mosaic GPU kernels refuse."""
    return jnp.float32 if dtype == jnp.float16 else dtype
