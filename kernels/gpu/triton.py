"""What every Triton-lowered kernel calls around its body: interpret mode, compiler parameters and
the matmul with its precision modes. (What depends on the jax version is in `linear_jax._compat`.)

Interpret mode comes from the kernel's config (`linear_jax.kernels.configs`): `interpret=None` runs
Pallas' interpreter exactly when the default backend is a CPU (how CI executes the kernels), True
forces it, False forces the Triton lowering, which is how tests export a kernel for "cuda" from a
CPU host (`jax.export(..., platforms=["cuda"])`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax import _compat


def interpret(config) -> bool:
    """Whether a kernel run with `config` executes in Pallas interpret mode."""
    mode = getattr(config, "interpret", None)
    return jax.default_backend() == "cpu" if mode is None else bool(mode)


def triton_params(config, num_warps: int, num_stages: int):
    """`pallas_call(compiler_params=...)`: None in interpret mode."""
    return None if interpret(config) else _compat.triton_compiler_params(num_warps, num_stages)


def dot(a, b, *, ta: bool = False, tb: bool = False, exact: bool = False,
        split_tf32: bool = False, interpret: bool = False):
    """a @ b (a^T if ta, b^T if tb) with float32 accumulation.

    Default: the operands' own precision (Triton runs a float32 dot as tf32). `exact`: IEEE float32
    products (on the CUDA cores, not the matrix units). `split_tf32`: float32-accurate products on
    the matrix units, three tf32 products of the split operands (Triton's tf32x3); interpret mode
    (`interpret`: on a CPU, which has no such algorithm) computes them as IEEE float32.
    """
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    prec = lax.Precision.HIGHEST if exact else None
    if split_tf32:
        prec = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)
