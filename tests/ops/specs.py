"""Op specs for the shared contract suite (`test_contract.py`).

A spec says how to draw valid inputs for an op and gives an independent float64 NumPy recurrence
for it. Each family adds its specs in its own `spec_<family>.py` module exposing `SPECS`; the
contract suite collects every such module, so a new op joins every contract test by adding a spec.

The impls a spec runs come from the op registry (`impls_of`): "recurrent", "chunk" and
"pallas:<backend>" for every kernel of the op that runs on this host (on a CPU the Triton and TPU
kernels, in Pallas interpret mode), so a new kernel joins every contract test by being registered.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable

import numpy as np

from linear_jax.ops import registry

# Strong gates: every log decay in [-25, -15] ("uniform") or at -20 ("constant"). At these values
# a chunk's cumulative decay sum reaches -400 and beyond, so exp(G_i - G_j) formed from differences
# of cumulative sums loses every digit while span sums stay exact (issue 16).
STRONG = ("uniform", "constant")


def strong_log_decays(rng, shape, kind):
    """float64 log decays of `shape`: uniform in [-25, -15] or all -20 (`kind` in `STRONG`)."""
    if kind == "uniform":
        return rng.uniform(-25.0, -15.0, shape)
    if kind == "constant":
        return np.full(shape, -20.0)
    raise ValueError(f"strong gates: kind must be one of {STRONG}, got {kind!r}")


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
    diff_args: tuple[str, ...] = ()   # float inputs the gradient tests differentiate
    has_segments: bool = True
    chunked: bool = True              # takes chunk_size
    # the registry op whose impls the spec runs (None: the name up to "[", e.g.
    # "linear_attention[normalize]" runs linear_attention's)
    op: str | None = None
    # impls to leave out, as (impl, reason) pairs: a kernel that buys nothing here beyond another
    # spec of the same op (say why), never one that fails
    narrow: tuple[tuple[str, str], ...] = ()
    # strong(args, rng, kind) -> args with every decay gate strong (`STRONG`, `strong_log_decays`);
    # None for an op without a decay. Each spec module says what "every gate strong" means for its
    # op (which of its inputs make the log decay, and how they are set).
    strong: Callable | None = None
    # draw_state(rng, args) -> a valid initial state, for an op whose state is not any float32
    # draw of `state_shape` (a log-linear state carries its Fenwick position); None: such a draw
    draw_state: Callable | None = None

    @property
    def op_name(self) -> str:
        return self.op or self.name.split("[")[0]


def impls_of(spec: OpSpec) -> list[str]:
    """"recurrent", "chunk" and "pallas:<backend>" of each kernel of the spec's op that runs here,
    in the registry's order, less `spec.narrow`."""
    rec = registry.record(spec.op_name)
    base = registry.record(rec.kernels_of) if rec.kernels_of else rec
    names = [n for n in ("recurrent", "chunk") if n in registry.available(spec.op_name)]
    names += [f"pallas:{k.backend}" for k in base.kernels if registry.runs_here(k)]
    left_out = dict(spec.narrow)
    unknown = set(left_out) - set(registry.available(spec.op_name))
    if unknown:
        raise ValueError(f"spec {spec.name}: narrow names impls its op does not have: "
                         f"{sorted(unknown)}")
    return [n for n in names if n not in left_out]


def narrow_kernels(op: str, reason: str) -> tuple[tuple[str, str], ...]:
    """`OpSpec.narrow` leaving out every kernel of `op` (registered, running here or not)."""
    return tuple((n, reason) for n in registry.available(op) if n.startswith("pallas:"))


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


def cast_like(args, new):
    """`new` (float64 NumPy) cast to the dtypes of the same-named arrays in `args`, merged in."""
    return {**args, **{n: np.asarray(x).astype(np.asarray(args[n]).dtype) for n, x in new.items()}}
