"""What every Mosaic TPU kernel calls around its body: interpret mode, compiler parameters, block
and scratch helpers, and the MXU matmul with its precision modes. (What depends on the jax version
is in `linear_jax._compat`.)

Interpret mode comes from the kernel's config (`linear_jax.kernels.configs.TpuConfig`):
`interpret=None` compiles on a TPU and runs TPU interpret mode everywhere else (a CPU in CI), True
forces interpret mode, False forces the Mosaic lowering, which is how tests export a kernel for
"tpu" from a CPU host (`jax.export(..., platforms=["tpu"])`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax import _compat

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST

# a block dim that is indexed, not sliced: the kernel sees the block without it
SQUEEZED = _compat.tpu_squeezed()


def interpret(config):
    """What to pass as `pallas_call(interpret=...)` for a kernel run with `config` (a TpuConfig or
    anything with its `interpret` field)."""
    mode = getattr(config, "interpret", None)
    if mode is None:
        mode = jax.default_backend() != "tpu"
    return _compat.tpu_interpret_params() if mode else False


def compiler_params(config, semantics: tuple[str, ...]):
    """Grid semantics ("parallel" / "arbitrary") and the config's scoped-VMEM limit."""
    return _compat.tpu_compiler_params(semantics, getattr(config, "vmem_limit_bytes", None))


def vmem(shape, dtype=F32):
    """A VMEM scratch buffer."""
    return _compat.tpu_vmem(shape, dtype)


def dot(a, b, *, ta: bool = False, tb: bool = False, mode: str = "exact"):
    """a @ b with a or b transposed, float32 accumulation.

    mode "exact": float32 operands at HIGHEST precision (multi-pass on the MXU). "mask": `a` is a
      0/1 matrix (exact in bf16) and `b` float32 split exactly into three bf16 parts: three passes
      give the float32 result of HIGHEST's six; this forms the span sums of gates and routes their
      gradients. "fast": bf16 operands, one MXU pass.
    "split": `a` as a sum of two bf16 parts, `b` in bf16 (for bf16 inputs, where b is exact in bf16
      and a is a float32 product that feeds the carried state, so the state keeps ~16 bits).
    "split3": both split, three passes (hi hi + lo hi + hi lo): ~16 bits for two float32 operands.
    """
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    if mode == "exact":
        return lax.dot_general(a.astype(F32), b.astype(F32), dims, precision=HIGHEST,
                               preferred_element_type=F32)
    bf = jnp.bfloat16
    if mode == "mask":
        a, b = a.astype(bf), b.astype(F32)
        out = None
        for _ in range(3):
            part = b.astype(bf)
            term = lax.dot_general(a, part, dims, preferred_element_type=F32)
            out = term if out is None else out + term
            b = b - part.astype(F32)
        return out
    bb = b.astype(bf)
    hi = a.astype(bf)
    out = lax.dot_general(hi, bb, dims, preferred_element_type=F32)
    if mode in ("split", "split3"):
        lo = (a.astype(F32) - hi.astype(F32)).astype(bf)
        out = out + lax.dot_general(lo, bb, dims, preferred_element_type=F32)
    if mode == "split3":
        b_lo = (b.astype(F32) - bb.astype(F32)).astype(bf)
        out = out + lax.dot_general(hi, b_lo, dims, preferred_element_type=F32)
    return out
