"""Logical axis names -> mesh axes, through one rules table.

Layers annotate each parameter with logical names (`nnx.with_partitioning(init, ("embed",
"heads"))`); the config holds the rules, pairs `(logical name, mesh axis | tuple of axes | None)`,
e.g. `(("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))`. A
dimension stays replicated when its name has no rule, when its mesh axes are already used by an
earlier dimension of the same array, or when its size is not a multiple of the axes' product (a
small model on a large mesh runs, it just shards less; the log says which names were skipped).
The optimiser state carries the parameters' annotations, so one function shards both. The layers of
a model are stacked on a leading axis named `layers` (`linear_jax.models.lm`), which the model
scans over: no rule may map it, so it is never sharded.
"""

from __future__ import annotations

import math

import jax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from linear_jax.models.lm import LAYERS_AXIS
from linear_jax.training.mesh import AXES, ConfigError

BATCH_AXES = ("data", "fsdp")


def check_rules(rules) -> dict[str, tuple[str, ...]]:
    """The rules as {logical name: mesh axes}; unknown mesh axes are a ConfigError."""
    table = {}
    for rule in rules:
        if len(rule) != 2:
            raise ConfigError(f"sharding rule {rule!r} is not a (logical name, mesh axes) pair")
        name, axes = rule
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        bad = [a for a in axes if a not in AXES]
        if bad:
            raise ConfigError(f"sharding rule {rule!r}: unknown mesh axes {bad}; axes are {AXES}")
        if name == LAYERS_AXIS and axes:
            raise ConfigError(f"sharding rule {rule!r}: {LAYERS_AXIS!r} is the stacked layer axis "
                              f"the model scans over; it stays unsharded")
        table[name] = axes
    return table


def logical_to_spec(names, shape, rules: dict, mesh) -> PartitionSpec:
    used, spec = set(), []
    for name, size in zip(names, shape, strict=True):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            logging.log_first_n(logging.INFO, "not sharding %r (size %d) over %s: not a multiple",
                                8, name, size, axes)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh, rules: dict):
    """NamedShardings for a tree of (abstract) arrays and nnx Variables; Variables keep their
    place in the tree so the result is a valid `in_shardings` / `out_shardings` for it."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding")
            if not names:
                return x.replace(replicated)
            return x.replace(NamedSharding(mesh, logical_to_spec(names, x.shape, rules, mesh)))
        return replicated

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh) -> NamedSharding:
    """Batch rows over `data` x `fsdp`, time over `seq`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, "seq"))


def describe(shardings) -> str:
    """One line per distinct spec with its parameter count, for the log."""
    counts: dict[str, int] = {}
    for x in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        spec = x.get_value().spec if isinstance(x, nnx.Variable) else x.spec
        counts[str(spec)] = counts.get(str(spec), 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
