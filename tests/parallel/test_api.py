"""The public face of `linear_jax.parallel`: one name for one thing (every public name a function
or a class, never a module), one `make_mesh`, zigzag attention that permutes for the caller, and a
self-contained docs/sequence_parallel.md that covers every public function."""

from __future__ import annotations

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import linear_jax.training
from linear_jax import parallel
from tests.parallel.common import packed_segments
from tests.parallel.test_hybrid import reference_attention
from tests.utils import assert_close

DOC = pathlib.Path(__file__).parents[2] / "docs" / "sequence_parallel.md"


def test_every_public_name_is_a_callable_not_a_module():
    for name in parallel.__all__:
        obj = getattr(parallel, name)
        assert not inspect.ismodule(obj) and callable(obj), name
    for name in ("attention", "short_conv", "ssd", "gla", "make_mesh"):
        assert inspect.isfunction(getattr(parallel, name)), name
    assert not hasattr(linear_jax.training, "make_mesh")          # one make_mesh


def test_make_mesh_one_constructor():
    mesh = parallel.make_mesh({"data": 2, "seq": 4})
    assert dict(mesh.shape) == {"data": 2, "seq": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.make_mesh((2, 4), ("data", "seq")).shape) == dict(mesh.shape)
    assert dict(parallel.make_mesh({"data": -1, "seq": 2}, jax.devices()[:6]).shape) == {
        "data": 3, "seq": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh({"seq": 16})
    with pytest.raises(ValueError, match="not a multiple of 3"):
        parallel.make_mesh({"data": -1, "seq": 3}, jax.devices()[:8])
    full = linear_jax.training.mesh_from_config({"seq": 2}, jax.devices()[:2])
    assert full.axis_names == ("data", "fsdp", "tensor", "seq")


def test_zigzag_attention_permutes_for_the_caller():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    T = 32
    q, k, v = f(2, T, 2, 8), f(2, T, 1, 8), f(2, T, 1, 8)
    seg = packed_segments(2, T)
    mesh = parallel.make_mesh({"seq": 4}, jax.devices()[:4])
    o = jax.jit(lambda q, k, v: parallel.attention(q, k, v, mesh=mesh, layout="zigzag",
                                                   segment_ids=seg))(q, k, v)
    assert_close(o, reference_attention(q, k, v, seg), 1e-5, "zigzag attention, sequence order")


def test_the_doc_is_self_contained_and_names_what_exists():
    text = DOC.read_text()
    assert "SEQUENCE_PARALLEL.md" not in text and "design note" not in text
    assert "shared/design" not in text
    called = set(re.findall(r"\b(?:parallel|sp)\.([A-Za-z_]+)\(", text))
    assert {"ssd", "attention", "short_conv", "gla", "make_mesh"} <= called, called
    for name in called:
        assert name in parallel.__all__, f"docs/sequence_parallel.md calls parallel.{name}"
    for name in parallel.__all__:
        assert f"`parallel.{name}`" in text or f"`{name}`" in text, f"{name} is not documented"
