"""Everything in linear_jax that depends on the JAX version, in one place.

Tested on jax 0.10.x (CPU) and 0.11.x (GPU). For `linear_jax.parallel`, what moves between
versions: where `shard_map` lives and whether its checking flag is `check_vma` or `check_rep`; the
axis types `jax.make_mesh` defaults to (Explicit in recent versions, which `shard_map` rejects for
unsharded inputs); how an all-gather whose result is the same on every device is spelled
(`all_gather(..., to="invarying")`, else the older `all_gather_invariant`); whether values carry a
varying-manual-axes (vma) type.

For the Pallas kernels (`linear_jax.kernels`), in the sections at the end: the Triton compiler
parameters (`jax.experimental.pallas.triton.CompilerParams` in 0.10 and 0.11, formerly
`pallas.TritonCompilerParams`); Mosaic GPU's `plgpu.kernel`, which takes `out_shape=` or `out_type=`
in 0.10 and only `out_type=` in 0.11; the Mosaic TPU compiler parameters (`pltpu.CompilerParams`,
formerly `TPUCompilerParams`, with `dimension_semantics` as strings), squeezed block dims
(`pl.Squeezed()`, formerly `None`), the VMEM memory space (`pltpu.VMEM`, formerly
`pltpu.TPUMemorySpace.VMEM`) and TPU interpret mode (`pltpu.InterpretParams()`, formerly
`interpret=True`, which runs the generic interpreter and does not model TPU memory spaces).
Pallas is imported inside those functions, so importing `linear_jax.parallel` never imports it.
(`pl.dot` is deprecated in 0.11 and gone in 0.12: kernels use `lax.dot_general`.)
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping

import jax
from jax import lax

_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def cpu_workarounds():
    """jaxlib 0.10's XLA CPU segfaults compiling or running its YNN fusion of the gla chunk form's
    backward (the whole process dies, no Python error). Turning YNN fusions off avoids it at no
    measurable cost; XLA reads XLA_FLAGS when the backend starts, so this runs on importing
    linear_jax and does nothing once a computation has run. Left alone when the user set the flag,
    and on jaxlib >= 0.11, whose XLA may not know it (an unknown XLA flag is fatal)."""
    import jaxlib

    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())
    flags = os.environ.get("XLA_FLAGS", "")
    if version < (0, 11) and "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_YNN_OFF}".strip()

try:
    _shard_map = jax.shard_map
except AttributeError:  # jax < 0.7
    from jax.experimental.shard_map import shard_map as _shard_map

_CHECK_KW = "check_vma" if "check_vma" in inspect.signature(_shard_map).parameters else "check_rep"
_GATHER_TO = "to" in inspect.signature(lax.all_gather).parameters


def shard_map(f, *, mesh, in_specs, out_specs, check=True):
    """`shard_map` under either spelling of its checking flag."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK_KW: check})


def make_mesh(sizes, devices=None, *legacy):
    """The one mesh constructor of linear_jax (`linear_jax.parallel.make_mesh`): a mesh with
    Auto axis types (shard_map takes replicated inputs on those; recent `jax.make_mesh` defaults
    to Explicit) over `devices` (default: all devices of all hosts, as many as the sizes need).

    `sizes`: {axis name: size} in mesh order, e.g. `{"data": 2, "seq": 4}`; one size may be -1
    (whatever the devices leave). The older spelling `make_mesh(shape, names[, devices])`, e.g.
    `make_mesh((2, 4), ("data", "seq"))`, is the same mesh. A ValueError says what does not fit.
    """
    if not isinstance(sizes, Mapping):                    # (shape, names[, devices])
        names, devices = devices, (legacy[0] if legacy else None)
        if names is None or len(tuple(names)) != len(tuple(sizes)):
            raise ValueError(f"make_mesh: give {{axis name: size}}, or a shape and as many names; "
                             f"got {sizes!r} and {names!r}")
        sizes = dict(zip(tuple(names), tuple(sizes), strict=True))
    elif legacy:
        raise TypeError("make_mesh(sizes, devices=None): too many arguments")
    names, shape = tuple(sizes), [int(n) for n in sizes.values()]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"make_mesh: axis names must be distinct and at least one, got {names}")
    if shape.count(-1) > 1 or any(n == 0 or n < -1 for n in shape):
        raise ValueError(f"make_mesh: sizes must be positive, one may be -1; got {dict(sizes)}")
    pool = list(jax.devices() if devices is None else devices)
    if -1 in shape:
        fixed = math.prod(n for n in shape if n != -1)
        if len(pool) % fixed:
            raise ValueError(f"make_mesh: {dict(sizes)} does not fit {len(pool)} devices "
                             f"({len(pool)} is not a multiple of {fixed})")
        shape[shape.index(-1)] = len(pool) // fixed
    need = math.prod(shape)
    if need > len(pool) or (devices is not None and need != len(pool)):
        raise ValueError(f"make_mesh: {dict(zip(names, shape, strict=True))} needs {need} "
                         f"devices, {len(pool)} are {'given' if devices is not None else 'here'}"
                         f" (one size may be -1 to fill them)")
    pool = pool[:need]
    try:
        from jax.sharding import AxisType
    except ImportError:
        return jax.make_mesh(tuple(shape), names, devices=pool)
    return jax.make_mesh(tuple(shape), names, axis_types=(AxisType.Auto,) * len(shape),
                         devices=pool)


def varying_axes(x) -> frozenset:
    """The mesh axes `x` is typed as varying over inside `shard_map` (empty when the JAX version
    or an unchecked `shard_map` does not track them)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)                      # jax 0.6 - 0.9
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)  # jax 0.10+
    return frozenset(vma or ())


def all_gather_same(x, axis_name):
    """`all_gather` stacked on a new leading axis, typed as the same on every device where the
    JAX version can say so (then a scan over it stays invariant and needs no psum)."""
    if _GATHER_TO:
        return lax.all_gather(x, axis_name, to="invarying")
    try:
        from jax._src.lax.parallel import all_gather_invariant
    except ImportError:
        return lax.all_gather(x, axis_name)
    return all_gather_invariant(x, axis_name)


def zeros_varying(shape, *like, exclude=()):
    """float32 zeros typed as varying over every axis any of `like` varies over (less `exclude`):
    a zero initial state handed to a single-device op whose `lax.scan` carry must match its varying
    inputs, or a zero state replicated along the sequence axis but split with the batch."""
    axes = frozenset().union(*(varying_axes(x) for x in like if x is not None)) - set(exclude)
    z = jax.numpy.zeros(shape, jax.numpy.float32)
    if not axes:
        return z
    if hasattr(lax, "pcast"):
        return lax.pcast(z, tuple(sorted(axes)), to="varying")
    return lax.pvary(z, tuple(sorted(axes)))


# --- Pallas GPU: the Triton lowering --------------------------------------------------------------

def triton_compiler_params(num_warps: int, num_stages: int):
    """Triton's `num_warps` / `num_stages` for a `pallas_call`."""
    try:  # jax >= 0.5
        from jax.experimental.pallas.triton import CompilerParams
    except ImportError:  # pragma: no cover - older jax
        from jax.experimental.pallas import TritonCompilerParams as CompilerParams
    return CompilerParams(num_warps=num_warps, num_stages=num_stages)


# --- Pallas TPU: Mosaic --------------------------------------------------------------------------

def tpu_compiler_params(semantics: tuple[str, ...], vmem_limit_bytes: int | None):
    """Grid semantics ("parallel" / "arbitrary") and the scoped-VMEM limit."""
    from jax.experimental.pallas import tpu as pltpu
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)


def tpu_squeezed():
    """A block dim that is indexed, not sliced: the kernel sees the block without it."""
    from jax.experimental import pallas as pl
    return pl.Squeezed() if hasattr(pl, "Squeezed") else None


def tpu_vmem(shape, dtype):
    """A VMEM scratch buffer."""
    from jax.experimental.pallas import tpu as pltpu
    space = pltpu.VMEM if hasattr(pltpu, "VMEM") else pltpu.TPUMemorySpace.VMEM
    return space(shape, dtype)


def tpu_interpret_params():
    """What `pallas_call(interpret=...)` takes for TPU interpret mode (VMEM, SMEM and the grid's
    sequential semantics modelled on the host)."""
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True


# --- Mosaic GPU (Pallas on Hopper; kernels/gpu/hopper) --------------------------------------------
# Imported lazily: `import linear_jax` never pulls in Pallas. What moves between jax 0.10 (CPU, CI)
# and 0.11 (the device), as read from jax's source at both:
# - `plgpu.kernel` takes `out_shape=` or `out_type=` in 0.10 and only `out_type=` in 0.11.2: we
#   always pass `out_type=`.
# - `CompilerParams.lowering_semantics` defaults to Lane in 0.10 and to Warpgroup in 0.11.0: we
#   always pass it (HopperChunkConfig.semantics), so both versions lower the same program.
# - `plgpu.load(ref, idx, layout=...)` needs the index in 0.10 and deprecates it in 0.11: we write
#   `layout_cast(ref[...], layout)`, which is what `load` does in both.
# - `pl.pallas_call(..., compiler_params=plgpu.CompilerParams())` does not lower on the GPU in
#   0.11.2 (checked on the device): kernels use `plgpu.kernel`.
# - The GPU interpreter (`InterpretGPUParams`, only under jax._src in 0.10 and 0.11) runs TMA
#   copies, mbarriers and SMEM loads on a CPU, but in 0.10.2 not `layout_cast`, nor a wgmma whose
#   operand is transposed or held in registers: the kernels swap those for plain ops when
#   interpreting.


def mosaic_gpu():
    """(pl, plgpu): `jax.experimental.pallas` and its Mosaic GPU module."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return pl, plgpu


def mosaic_gpu_interpret_params():
    """The parameters that run a `plgpu.kernel` in the GPU interpreter on a CPU."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


# Named-scope ranges a traced Mosaic GPU kernel records per warpgroup (16 bytes of SMEM each).
PROFILE_RANGES = 256


def mosaic_gpu_kernel(body, *, out_type, grid, grid_names, num_threads, thread_name,
                      scratch_types, semantics: str, approx_math: bool, interpret: bool,
                      name: str, profile_dir: str = "", no_auto_barriers: bool = False):
    """`plgpu.kernel` with the lowering semantics named ("lane" | "warpgroup") and the output
    types under the keyword both versions take; in the GPU interpreter when `interpret`. With
    `profile_dir`, every call writes a Chrome trace of the kernel's named scopes (per warpgroup,
    up to PROFILE_RANGES ranges each) into that directory. `no_auto_barriers` sets
    `CompilerParams(unsafe_no_auto_barriers=True)`: no warpgroup barrier around each ref store
    (the kernel orders its shared-memory accesses itself)."""
    _, plgpu = mosaic_gpu()
    sem = {"lane": plgpu.LoweringSemantics.Lane,
           "warpgroup": plgpu.LoweringSemantics.Warpgroup}[semantics]
    extra = {"interpret": mosaic_gpu_interpret_params()} if interpret else {}
    prof = {"profile_space": PROFILE_RANGES, "profile_dir": profile_dir} if profile_dir else {}
    prof |= {"unsafe_no_auto_barriers": True} if no_auto_barriers else {}
    return plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=num_threads,
        thread_name=thread_name, scratch_types=scratch_types, kernel_name=name,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=sem, approx_math=approx_math,
            **prof),
        **extra)
