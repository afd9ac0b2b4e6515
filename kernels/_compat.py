"""The one place that knows which jax version runs the kernels (0.10.x on CPU CI, 0.11.x on GPU).

Kernels import Pallas through here: `pl`, the Triton compiler parameters, and `interpret()`, which
says whether a `pallas_call` must run in interpret mode (any CPU backend). Differences seen so far:

- `pl.dot` is deprecated in 0.11 and gone in 0.12: kernels use `lax.dot_general` (see `dot`).
- The Triton compiler parameters are `jax.experimental.pallas.triton.CompilerParams` in both
  0.10.2 and 0.11.2 (older releases named them `TritonCompilerParams`).
- Mosaic GPU's `plgpu.kernel` takes `out_shape=` or `out_type=` in 0.10 and only `out_type=` in
  0.11 (not used yet: every kernel here lowers through Triton).
"""

from __future__ import annotations

import contextlib

import jax
from jax import lax
from jax.experimental import pallas as pl

try:  # jax >= 0.5
    from jax.experimental.pallas.triton import CompilerParams as _TritonParams
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.pallas import TritonCompilerParams as _TritonParams

__all__ = ["pl", "dot", "interpret", "triton_params", "lower_for_gpu"]
_FORCE_COMPILED = False


def interpret() -> bool:
    """Pallas GPU kernels run in interpret mode on a CPU backend (how CI executes them)."""
    return jax.default_backend() == "cpu" and not _FORCE_COMPILED


@contextlib.contextmanager
def lower_for_gpu():
    """Trace the kernels for the Triton lowering even on a CPU host, so that
    `jax.export(..., platforms=["cuda"])` checks on CPU that every kernel lowers to Triton IR."""
    global _FORCE_COMPILED
    old, _FORCE_COMPILED = _FORCE_COMPILED, True
    try:
        yield
    finally:
        _FORCE_COMPILED = old


def triton_params(num_warps: int, num_stages: int):
    return None if interpret() else _TritonParams(num_warps=num_warps, num_stages=num_stages)


def dot(a, b, *, ta: bool = False, tb: bool = False, exact: bool = False,
        split_tf32: bool = False):
    """a @ b (a^T if ta, b^T if tb) with float32 accumulation.

    `exact` asks for IEEE float32 products (Triton's default for a float32 dot is tf32, and IEEE
    runs on the CUDA cores, not the matrix units). `split_tf32` asks for float32-accurate products
    on the matrix units: three tf32 products of the split operands (Triton's tf32x3); interpret mode
    (a CPU) computes them in IEEE float32.
    """
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    prec = lax.Precision.HIGHEST if exact else None
    if split_tf32:
        prec = lax.Precision.HIGHEST if interpret() else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jax.numpy.float32)
