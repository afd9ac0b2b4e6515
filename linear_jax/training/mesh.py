"""The device mesh: named axes `data`, `fsdp`, `tensor`, `seq`.

- `data`: pure data parallelism (parameters replicated).
- `fsdp`: data parallelism with parameters and optimiser state sharded (gathered per use).
- `tensor`: tensor parallelism (heads, MLP width, vocabulary split across devices).
- `seq`: reserved for sequence parallelism (`linear_jax.parallel`, shard_map over `seq`).

Axes are `AxisType.Auto`: the compiler propagates shardings from the annotated inputs and outputs
of `jit` and `shard_map` regions compose with it (recent `jax.make_mesh` defaults to Explicit).
`mesh_from_config` builds it from a config's `mesh` section through `linear_jax.parallel.make_mesh`,
the one mesh constructor.
"""

from __future__ import annotations

import jax
from absl import logging

AXES = ("data", "fsdp", "tensor", "seq")


class ConfigError(ValueError):
    """A configuration that cannot run; its message is shown to the user without a traceback."""


def mesh_from_config(sizes, devices=None) -> jax.sharding.Mesh:
    """The training mesh from a config's `mesh` section: every axis of `AXES`, in that order
    (those the section leaves out of size 1, one may be -1), over all of `devices` (default:
    every device of every host). Built by `linear_jax.parallel.make_mesh`; what does not fit is
    a ConfigError."""
    from linear_jax.parallel import make_mesh

    sizes = dict(sizes)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ConfigError(f"mesh: unknown axes {unknown}; the axes are {list(AXES)}")
    devices = list(jax.devices() if devices is None else devices)
    try:
        mesh = make_mesh({a: int(sizes.get(a, 1)) for a in AXES}, devices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
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
