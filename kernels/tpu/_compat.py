"""The version-specific corner of the Pallas TPU API, in one place.

Checked against jax 0.10.2: `pltpu.CompilerParams` (formerly `pltpu.TPUCompilerParams`),
`dimension_semantics` given as strings, `pl.Squeezed()` for squeezed block dims (formerly `None`),
and TPU interpret mode through `pltpu.InterpretParams` (formerly `interpret=True`, which runs the
generic interpreter and does not model TPU memory spaces).
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams

# a block dim that is indexed, not sliced: the kernel sees the block without it
SQUEEZED = pl.Squeezed() if hasattr(pl, "Squeezed") else None

VMEM = pltpu.VMEM if hasattr(pltpu, "VMEM") else pltpu.TPUMemorySpace.VMEM


def compiler_params(semantics: tuple[str, ...], vmem_limit_bytes: int | None):
    """Grid semantics ("parallel" / "arbitrary") and the scoped-VMEM limit."""
    return _CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)


def interpret_arg(interpret: bool | None):
    """What to pass as `pallas_call(interpret=...)`.

    None picks by backend: compiled on a TPU, TPU interpret mode (which models VMEM, SMEM and the
    grid's sequential semantics on the host) everywhere else. False forces the Mosaic lowering,
    which is how tests export a TPU module from a CPU host.
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if not interpret:
        return False
    return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
