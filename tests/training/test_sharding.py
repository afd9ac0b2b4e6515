"""Mesh shapes and the logical-name -> mesh-axis rules."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from linear_jax.training import sharding
from linear_jax.training.mesh import ConfigError
from linear_jax.training.mesh import mesh_from_config as make_mesh

RULES = sharding.check_rules((("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
                              ("vocab", "tensor"), ("batch", ("data", "fsdp")), ("kv", None)))


def test_mesh_from_config_fills_and_rejects():
    shape = lambda sizes, n: tuple(make_mesh(sizes, jax.devices()[:n]).shape.values())
    assert shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2, 1)
    assert shape({"data": 1}, 1) == (1, 1, 1, 1)
    assert make_mesh({"seq": 2, "data": 2}, jax.devices()[:4]).axis_names == (
        "data", "fsdp", "tensor", "seq")                      # every axis, in AXES order
    with pytest.raises(ConfigError, match="needs 4 devices, 8 are given"):
        make_mesh({"data": 4}, jax.devices()[:8])
    with pytest.raises(ConfigError, match="not a multiple of 3"):
        make_mesh({"data": -1, "tensor": 3}, jax.devices()[:8])
    with pytest.raises(ConfigError, match="unknown axes"):
        make_mesh({"model": 2}, jax.devices()[:8])


def test_rules_map_names_and_skip_what_cannot_shard():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    spec = lambda names, shape: sharding.logical_to_spec(names, shape, RULES, mesh)
    assert spec(("vocab", "embed"), (64, 32)) == P("tensor", "fsdp")
    assert spec(("embed", "heads"), (32, 48)) == P("fsdp", "tensor")
    assert spec(("heads", "kv"), (4, 8)) == P("tensor", None)            # kv: no rule
    assert spec(("embed", "heads"), (32, 3)) == P("fsdp", None)          # 3 % 2: replicated
    assert spec(("mlp", "heads"), (8, 8)) == P("tensor", None)           # tensor already used
    assert spec(("batch", None), (8, 8)) == P(("data", "fsdp"), None)
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        sharding.check_rules((("embed", "model"),))
    with pytest.raises(ConfigError, match="'layers' is the stacked layer axis"):
        sharding.check_rules((("layers", "fsdp"),))
    assert sharding.check_rules((("layers", None),))["layers"] == ()


def test_tree_shardings_keep_variables_and_annotations():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    with nnx.use_eager_sharding(False):
        lin = nnx.eval_shape(lambda: nnx.Linear(
            32, 48, rngs=nnx.Rngs(0), kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(), ("embed", "heads"))))
    state = nnx.state(lin)
    sh = sharding.tree_shardings(state, mesh, RULES)
    assert sh["kernel"].get_value().spec == P("fsdp", "tensor")
    assert sh["bias"].get_value().spec == P()
    assert jax.tree.structure(sh) == jax.tree.structure(state)
