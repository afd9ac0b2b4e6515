"""The one place where `impl=` is resolved.

Every op passes its name, the requested `impl`, the sequence length and the implementations it has.
`"auto"` picks by platform: the Pallas kernel on an accelerator when the op has one, otherwise the
chunk-parallel XLA form; a single step (T == 1, decoding) always takes the recurrent form, which is
the same function with no chunk padding. The element-wise scans (a vector state, not a matrix) are
cheaper as a plain `lax.scan` than as a chunked associative scan on a CPU, forward and backward
(measured: benchmarks/results/scans_xla_cpu.json), so `"auto"` takes their recurrent form there.
Explicit requests are honoured or refused, never swapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import jax

Impl = Literal["auto", "recurrent", "chunk", "pallas"]
IMPLS: tuple[str, ...] = ("auto", "recurrent", "chunk", "pallas")
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")
_ELEMENTWISE = ("hgrn", "diagonal_scan", "selective_scan")
# Kernels that have passed interpret-mode tests but not yet a device check: reachable with
# impl="pallas", not chosen by "auto" until their check has run on a GPU. None at present: hgrn,
# diagonal_scan and selective_scan passed theirs on an H200 (benchmarks/results/logs/
# run1_elementwise.log, run3_output_tail.log, run5_scans_lanes.log), mlstm all four shapes
# (run7_mlstm.log).
_UNCHECKED_ON_DEVICE: tuple[str, ...] = ()


def platform() -> str:
    return jax.default_backend()


def resolve(op: str, impl: str, T: int, available: Mapping[str, object]) -> str:
    """Returns the implementation name to run; raises ValueError for unknown or missing impls."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        if impl not in available:
            raise ValueError(
                f"{op}: impl={impl!r} is not implemented for this op; "
                f"available: {sorted(available)}"
            )
        return impl
    if T == 1 and "recurrent" in available:
        return "recurrent"
    on_accelerator = platform() in _ACCELERATORS
    if on_accelerator and "pallas" in available and op not in _UNCHECKED_ON_DEVICE:
        return "pallas"
    if not on_accelerator and op in _ELEMENTWISE and "recurrent" in available:
        return "recurrent"
    return "chunk" if "chunk" in available else "recurrent"
