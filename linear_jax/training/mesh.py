"""The device mesh: named axes `data`, `fsdp`, `tensor`, `seq`.

- `data`: pure data parallelism (parameters replicated).
- `fsdp`: data parallelism with parameters and optimiser state sharded (gathered per use).
- `tensor`: tensor parallelism (heads, MLP width, vocabulary split across devices).
- `seq`: reserved for sequence parallelism (`linear_jax.parallel`, shard_map over `seq`).

Axes are `AxisType.Auto`: the compiler propagates shardings from the annotated inputs and outputs
of `jit` and `shard_map` regions compose with it (recent `jax.make_mesh` defaults to Explicit).
"""

from __future__ import annotations

import math

import jax
from absl import logging

AXES = ("data", "fsdp", "tensor", "seq")


class ConfigError(ValueError):
    """A configuration that cannot run; its message is shown to the user without a traceback."""


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes in `AXES` order; at most one size may be -1 (whatever the devices leave)."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ConfigError(f"mesh: unknown axes {unknown}; the axes are {list(AXES)}")
    shape = [int(sizes.get(a, 1)) for a in AXES]
    named = lambda: dict(zip(AXES, shape, strict=True))
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh: sizes must be positive, one may be -1; got {named()}")
    if -1 in shape:
        fixed = math.prod(s for s in shape if s != -1)
        if num_devices % fixed:
            raise ConfigError(f"mesh: {named()} does not fit {num_devices} devices "
                              f"({num_devices} is not a multiple of {fixed})")
        shape[shape.index(-1)] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh: {named()} needs {math.prod(shape)} devices, "
                          f"but {num_devices} are available (set one axis to -1 to fill)")
    return tuple(shape)


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all devices of all hosts) with the axis sizes `sizes`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(sizes), len(devices))
    mesh = jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                         devices=devices)
    logging.info("mesh %s over %d %s device(s)", dict(mesh.shape), len(devices),
                 devices[0].platform)
    return mesh


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-host job. With no arguments the cluster is detected (SLURM, Open MPI,
    Kubernetes, Cloud TPU); otherwise every process passes the same coordinator `host:port` and
    process count, and its own id. CPU processes exchange collectives through gloo (jax's
    default `jax_cpu_collectives_implementation`); tests/training/test_distributed.py trains with
    two local CPU processes of 2 devices each (`JAX_NUM_CPU_DEVICES=2`)."""
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
