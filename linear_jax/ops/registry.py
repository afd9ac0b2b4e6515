"""The one registry of implementations, and the one place where `impl=` is resolved.

Every op declares one `OpRecord` beside its math (the `lax.scan` reference, the chunk-parallel XLA
form, its Pallas kernels per backend, its sequence-parallel form) and calls `dispatch` in its entry:

    o, S = registry.dispatch("simple_gla", impl, T, config)(q, k, v, g, scale=..., ...)

Ops, layers (through `linear_jax.parallel.recurrence`) and `parallel` all resolve through here, so
adding a kernel is adding a `Kernel` line to its op's record.

`impl` is one of
  "recurrent"         the `lax.scan` reference;
  "chunk"             the chunk-parallel XLA form;
  "pallas"            the op's kernel for this device (see `default_kernel`);
  "pallas:<backend>"  that kernel: "mosaic_gpu" (Hopper: TMA, wgmma), "triton" (any NVIDIA GPU),
                      "tpu" (Mosaic TPU);
  "auto"              one step (T == 1, decoding) takes the reference, which is the same function
                      without chunk padding; on an accelerator the device's kernel when one exists
                      and has passed its device check (`Kernel.auto`) and does not leave these
                      inputs to the chunk form (`Kernel.auto_declines`: float32 inputs of the
                      Triton chunk kernels), else the chunk form; on a
                      CPU the chunk form, except for the element-wise scans (a vector state),
                      whose plain `lax.scan` is faster there forward and backward (measured:
                      benchmarks/results/scans_xla_cpu.json).
Explicit requests are honoured or refused with a ValueError, never swapped.

On a CPU backend a kernel runs in Pallas interpret mode (how CI executes the Triton and TPU
kernels; Mosaic GPU kernels use TMA copies, which interpret mode cannot run, so a CPU only exports
them).

Kernel configs are arguments: `config` is a kernel config (a frozen dataclass of
`linear_jax.kernels.configs`), a tuple of them (a model's configs for several backends and ops:
each kernel takes the one of its type and ignores the rest), or None (the per-device defaults of
`linear_jax.kernels.configs`). A lone config must belong to the kernel that runs. Configs are
ignored by the reference and chunk forms. Kernels and configs are named by "module:attribute"
strings and imported on first use, so importing the ops never imports Pallas.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import jax

IMPLS = ("auto", "recurrent", "chunk", "pallas")

# backend -> (platform family it compiles for, whether a CPU can run it in interpret mode)
BACKENDS = {
    "mosaic_gpu": ("gpu", False),
    "triton": ("gpu", True),
    "tpu": ("tpu", True),
}
# on a CPU, bare "pallas" runs the first of these the op has (in interpret mode)
_CPU_ORDER = ("triton", "tpu")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Pallas kernel of an op.

    backend: a key of `BACKENDS`. fn: "module:function", called as
      `fn(*arrays, scale=..., initial_state=..., segment_ids=..., chunk_size=..., config=cfg)`
      with the op's own arguments (the reference's signature plus chunk_size and config).
    config: "module:Class" of its frozen config dataclass; `Class.default(device)` gives the
      per-device default. auto: "auto" may choose it (it passed its check on a device).
    min_capability: the least CUDA compute capability it runs on, e.g. (9, 0) for Hopper.
    max_capability: the greatest (wgmma kernels: (9, 0); Blackwell has no wgmma).
    accepts: "module:function" called with the op's leading arrays (q, k, v for the chunk
      family), returning None when the kernel takes them or a reason (a dtype or size it does
      not support): "auto" and bare "pallas" then pass over it, "pallas:<backend>" raises it.
    auto_declines: "module:function" with the same arguments, returning None or why "auto" leaves
      these inputs to the chunk form though the kernel takes them (measured slower there, e.g. the
      Triton kernels' float32 products on the CUDA cores); bare and named "pallas" still run it.
    """

    backend: str
    fn: str
    config: str
    auto: bool = True
    min_capability: tuple[int, int] | None = None
    max_capability: tuple[int, int] | None = None
    accepts: str | None = None
    auto_declines: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"Kernel: backend must be one of {tuple(BACKENDS)}, got "
                             f"{self.backend!r}")
        for field in ("fn", "config", "accepts", "auto_declines"):
            path = getattr(self, field)
            if field in ("accepts", "auto_declines") and path is None:
                continue
            if not isinstance(path, str) or path.count(":") != 1:
                raise ValueError(f"Kernel: {field} must be a 'module:attribute' string, got "
                                 f"{path!r}")


@dataclasses.dataclass(frozen=True)
class OpRecord:
    """Everything that implements one op.

    reference: the `lax.scan` form (no chunk_size argument). chunk: the chunk-parallel XLA form.
    kernels: in order of preference on a device that runs several. seq_parallel:
    "module:function" of its sequence-parallel form (`linear_jax.parallel`), or None.
    elementwise: a vector-state scan ("auto" takes the reference on a CPU).
    kernels_of: the op runs on another op's implementations (ssd on simple_gla's): its impls and
    kernels are that op's.
    """

    name: str
    reference: Callable | None = None
    chunk: Callable | None = None
    kernels: tuple[Kernel, ...] = ()
    seq_parallel: str | None = None
    elementwise: bool = False
    kernels_of: str | None = None


_RECORDS: dict[str, OpRecord] = {}


def register(record: OpRecord) -> OpRecord:
    if record.name in _RECORDS and _RECORDS[record.name] != record:
        raise ValueError(f"registry: op {record.name!r} is registered twice")
    _RECORDS[record.name] = record
    return record


def record(op: str) -> OpRecord:
    if op not in _RECORDS:
        importlib.import_module("linear_jax.ops")     # the op modules register on import
    if op not in _RECORDS:
        raise ValueError(f"registry: no op {op!r}; known: {sorted(_RECORDS)}")
    return _RECORDS[op]


def records() -> dict[str, OpRecord]:
    importlib.import_module("linear_jax.ops")
    return dict(_RECORDS)


@functools.cache
def load(path: str):
    """The attribute named by "module:attribute"."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def _platform() -> str:
    backend = jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(backend, "cpu")


def _capability() -> tuple[int, int] | None:
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if not cc:
        return None
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)


def runs_here(kernel: Kernel) -> bool:
    """Whether `kernel` can run on the default device (compiled, or interpreted on a CPU)."""
    family, interpretable = BACKENDS[kernel.backend]
    platform = _platform()
    if platform == "cpu":
        return interpretable
    if platform != family:
        return False
    if kernel.min_capability is None and kernel.max_capability is None:
        return True
    cc = _capability()
    if cc is None:
        return False
    return ((kernel.min_capability is None or cc >= kernel.min_capability)
            and (kernel.max_capability is None or cc <= kernel.max_capability))


def refusal(kernel: Kernel, args, *, auto: bool = False) -> str | None:
    """Why `kernel` cannot take the op's arrays `args` (None: it can, or no arrays were given);
    with `auto`, also why "auto" leaves them to the chunk form (`Kernel.auto_declines`)."""
    if not args:
        return None
    for hook in (kernel.accepts, kernel.auto_declines if auto else None):
        if hook is not None and (reason := load(hook)(*args)) is not None:
            return reason
    return None


def default_kernel(rec: OpRecord, *, auto: bool = False, args=()) -> Kernel | None:
    """The kernel "auto" (with `auto`) or bare "pallas" runs here: the first registered kernel
    that runs on this device, takes these inputs (`Kernel.accepts`) and has passed its device
    check (`Kernel.auto`); bare "pallas" falls back to the first that runs and takes them when
    none has passed a check. On a CPU: the Triton kernel, else the TPU one, in interpret mode
    ("auto" never picks a kernel on a CPU)."""
    platform = _platform()
    if platform == "cpu":
        if auto:
            return None
        by_backend = {k.backend: k for k in rec.kernels}
        return next((by_backend[b] for b in _CPU_ORDER if b in by_backend), None)
    usable = [k for k in rec.kernels if runs_here(k) and refusal(k, args, auto=auto) is None]
    checked = [k for k in usable if k.auto]
    if checked:
        return checked[0]
    return None if auto or not usable else usable[0]


@dataclasses.dataclass(frozen=True)
class Choice:
    """A resolved implementation: `impl` is "recurrent", "chunk" or "pallas:<backend>"."""

    op: str
    impl: str
    kernel: Kernel | None = None
    config: object = None

    @property
    def is_kernel(self) -> bool:
        return self.kernel is not None


def _check_config(op: str, config) -> None:
    """A config is a frozen dataclass (or a tuple of them): anything else is a mistake that the XLA
    forms, which ignore configs, would otherwise hide until a kernel runs."""
    items = config if isinstance(config, (tuple, list)) else () if config is None else (config,)
    for c in items:
        if not dataclasses.is_dataclass(c) or isinstance(c, type):
            raise ValueError(f"{op}: config must be a kernel config (a frozen dataclass of "
                             f"linear_jax.kernels.configs), a tuple of them or None, got "
                             f"{type(c).__name__} {c!r}")


def _config_for(op: str, kernel: Kernel, config):
    """The config the kernel runs with: the given one of its type, else its device default."""
    cls = load(kernel.config)
    if config is None:
        return cls.default(jax.devices()[0])
    if isinstance(config, (tuple, list)):
        mine = [c for c in config if isinstance(c, cls)]
        if len(mine) > 1:
            raise ValueError(f"{op}: config holds {len(mine)} configs of type {cls.__name__}; "
                             f"give at most one per kernel")
        return mine[0] if mine else cls.default(jax.devices()[0])
    if not isinstance(config, cls):
        raise ValueError(f"{op}: config {type(config).__name__} does not configure the "
                         f"{kernel.backend} kernel that impl resolved to (it takes "
                         f"{cls.__name__}); pass impl='pallas:<backend>' to choose the kernel")
    return config


def resolve(op: str, impl: str, T: int, config=None, args=()) -> Choice:
    """The implementation `impl` names for op `op` on a sequence of T steps, on this device;
    `args`: the op's leading arrays, which a kernel may decline (`Kernel.accepts`)."""
    rec = record(op)
    if not isinstance(impl, str):
        raise ValueError(f"{op}: impl must be a string, one of {IMPLS} or 'pallas:<backend>', "
                         f"got {impl!r}")
    _check_config(op, config)
    base = _RECORDS[rec.kernels_of] if rec.kernels_of else rec
    kind, _, backend = impl.partition(":")
    if kind not in IMPLS or (backend and kind != "pallas"):
        raise ValueError(f"{op}: impl must be one of {IMPLS} or 'pallas:<backend>' with backend in "
                         f"{tuple(BACKENDS)}, got {impl!r}")
    if kind == "auto":
        if T == 1 and base.reference is not None:
            return Choice(op, "recurrent")
        kernel = default_kernel(base, auto=True, args=args)
        if kernel is not None:
            return Choice(op, f"pallas:{kernel.backend}", kernel, _config_for(op, kernel, config))
        if _platform() == "cpu" and base.elementwise and base.reference is not None:
            return Choice(op, "recurrent")
        return Choice(op, "chunk" if base.chunk is not None else "recurrent")
    if kind in ("recurrent", "chunk"):
        if getattr(base, "reference" if kind == "recurrent" else "chunk") is None:
            raise ValueError(f"{op}: impl={impl!r} is not implemented for this op; available: "
                             f"{available(op)}")
        return Choice(op, kind)
    if backend:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: unknown kernel backend in impl={impl!r}; backends: "
                             f"{tuple(BACKENDS)}")
        kernel = next((k for k in base.kernels if k.backend == backend), None)
        if kernel is None:
            raise ValueError(f"{op}: impl={impl!r}: this op has no {backend} kernel; available: "
                             f"{available(op)}")
        reason = refusal(kernel, args)
        if reason is not None:
            raise ValueError(f"{op}: impl={impl!r}: {reason}")
    else:
        kernel = default_kernel(base, args=args)
        if kernel is None:
            raise ValueError(f"{op}: impl='pallas': no kernel of this op runs on "
                             f"{_platform()}; available: {available(op)}")
    cfg = _config_for(op, kernel, config)
    if not runs_here(kernel) and getattr(cfg, "interpret", None) is not False:
        raise ValueError(f"{op}: the {kernel.backend} kernel does not run on {_platform()} "
                         f"(nor in interpret mode there)")
    return Choice(op, f"pallas:{kernel.backend}", kernel, cfg)


def available(op: str) -> list[str]:
    """The impl names op `op` accepts (besides "auto")."""
    rec = record(op)
    base = _RECORDS[rec.kernels_of] if rec.kernels_of else rec
    names = [n for n, f in (("recurrent", base.reference), ("chunk", base.chunk)) if f is not None]
    if base.kernels:
        names += ["pallas"] + [f"pallas:{k.backend}" for k in base.kernels]
    return names


def implementation(choice: Choice) -> Callable:
    """The callable of a resolved choice, taking the op's arguments (and chunk_size; it drops it
    for the reference and adds the config for a kernel)."""
    base = _RECORDS[record(choice.op).kernels_of or choice.op]
    if choice.impl == "recurrent":
        ref = base.reference
        return lambda *a, chunk_size=None, **kw: ref(*a, **kw)
    if choice.impl == "chunk":
        return base.chunk
    return functools.partial(load(choice.kernel.fn), config=choice.config)


def dispatch(op: str, impl: str, T: int, config=None, args=()) -> Callable:
    """`implementation(resolve(op, impl, T, config, args))`: what an op's entry calls."""
    return implementation(resolve(op, impl, T, config, args))
