"""Op specs for the shared contract suite (`test_contract.py`).

A spec says how to draw valid inputs for an op and gives an independent float64 NumPy recurrence
for it. Each family adds its specs in its own `spec_<family>.py` module exposing `SPECS`; the
contract suite collects every such module, so a new op joins every contract test by adding a spec.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable                      # the public op: fn(**args, **kwargs)
    # make(rng, B, T, dtype) -> (args: array inputs named as the op's parameters, kwargs: extra
    # static keyword arguments); float inputs in `dtype`.
    make: Callable
    # reference(args as float64 NumPy, initial_state or None, segment_ids or None) -> (o, S),
    # written independently of the library, in float64.
    reference: Callable
    # state_shape(args) -> shape of the final state (for initial_state draws)
    state_shape: Callable
    impls: tuple[str, ...] = ("recurrent", "chunk")
    diff_args: tuple[str, ...] = ()   # float inputs the gradient tests differentiate
    has_segments: bool = True
    chunked: bool = True              # takes chunk_size


def all_specs() -> list[OpSpec]:
    import tests.ops as pkg

    specs = []
    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if m.name.startswith("spec_"):
            specs.extend(importlib.import_module(f"tests.ops.{m.name}").SPECS)
    return specs


def resets(seg):
    """bool [B, T]: state zeroed before step t (never at t = 0)."""
    r = np.zeros(seg.shape, bool)
    r[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return r
