"""The pieces hybrid models need on the same `seq` axis: sequence-parallel causal softmax attention
(contiguous and zigzag layouts, packed documents) and the halo of a short causal convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from linear_jax import _compat, parallel
from linear_jax.ops.short_conv import short_conv
from linear_jax.parallel import attention, from_zigzag, to_zigzag
from linear_jax.parallel.halo import halo_short_conv
from linear_jax.parallel.softmax import positions
from tests.parallel.common import packed_segments
from tests.utils import assert_close

pytestmark = pytest.mark.timeout(300)
T, D = 64, 8


def mesh_of(n):
    return parallel.make_mesh({"seq": n}, jax.devices()[:n])


def reference_attention(q, k, v, seg):
    """Dense causal attention over the global order, documents kept apart, written out."""
    Tq = q.shape[1]
    mask = np.tril(np.ones((Tq, Tq), bool))[None]
    if seg is not None:
        doc = np.cumsum(np.concatenate([np.zeros((seg.shape[0], 1), bool),
                                        np.asarray(seg)[:, 1:] != np.asarray(seg)[:, :-1]], 1), 1)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    s = jnp.where(jnp.asarray(mask)[:, None], s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v, precision="highest")


def test_zigzag_layout():
    pos = positions(16, 4, "zigzag")
    assert pos[0].tolist() == [0, 1, 14, 15] and pos[3].tolist() == [6, 7, 8, 9]
    x = jnp.arange(2 * 16).reshape(2, 16)
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 4), 4), x)
    with pytest.raises(ValueError, match="multiple of 2P"):
        positions(12, 4, "zigzag")


@pytest.mark.parametrize("layout,P_", [("contiguous", 4), ("zigzag", 2), ("zigzag", 8)])
def test_attention_matches_single_device(layout, P_):
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v = f(2, T, 4, D), f(2, T, 2, D), f(2, T, 2, D)      # grouped K/V heads
    seg = packed_segments(2, T)
    mesh = mesh_of(P_)

    def par(q, k, v):       # in sequence order: zigzag permutes in and out by itself
        return attention(q, k, v, mesh=mesh, layout=layout, segment_ids=seg)

    ref = lambda q, k, v: reference_attention(q, k, v, seg)
    o_ref = jax.jit(ref)(q, k, v)
    assert_close(jax.jit(par)(q, k, v), o_ref, 1e-5, "attention")
    w = f(2, T, 4, D)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    g1 = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(loss(par), argnums=(0, 1, 2)))(q, k, v)
    for n, a, b in zip("qkv", g2, g1, strict=True):
        assert_close(a, b, 1e-5, f"d{n}")
    if layout == "zigzag":      # arrays already in zigzag order stay in it
        z = lambda a: to_zigzag(a, P_)
        # jitted: op-by-op dispatch of the sharded attention costs several times its compilation
        o = jax.jit(lambda q, k, v, s: attention(q, k, v, mesh=mesh, layout=layout,
                                                 segment_ids=s, permute=False))(
            z(q), z(k), z(v), z(seg))
        assert_close(from_zigzag(o, P_), o_ref, 1e-5, "attention, permute=False")


@pytest.mark.parametrize("with_cache", [False, True])
def test_halo_short_conv(with_cache):
    """Halo across shard boundaries, a document starting exactly on one (T/2, T/4 for P = 4),
    and the caller's cache on shard 0."""
    rng = np.random.default_rng(1)
    W, P_ = 4, 4
    x = jnp.asarray(rng.standard_normal((2, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((W, D)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((D,)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((2, W - 1, D)), jnp.float32) if with_cache else None
    seg = packed_segments(2, T)

    def local(x, w, b, cache, seg):
        return halo_short_conv(x, w, b, activation="silu", initial_state=cache, segment_ids=seg,
                               axis_name="seq")

    specs = (P(None, "seq"), P(), P(), None if cache is None else P(), P(None, "seq"))
    par = _compat.shard_map(local, mesh=mesh_of(P_), in_specs=specs,
                            out_specs=(P(None, "seq"), P("seq")))
    ref = lambda x, w, b: short_conv(x, w, b, activation="silu", initial_state=cache,
                                     segment_ids=seg)
    y, caches = jax.jit(par)(x, w, b, cache, seg)
    y1, c1 = jax.jit(ref)(x, w, b)
    assert_close(y, y1, 1e-6, "conv output")
    assert_close(caches[-2:], c1, 1e-6, "cache on the last shard")
    loss = lambda fn: lambda x, w, b: jnp.sum(jnp.sin(fn(x, w, b)[0]))
    g1 = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(x, w, b)
    g2 = jax.jit(jax.grad(loss(lambda x, w, b: par(x, w, b, cache, seg)), argnums=(0, 1, 2)))(
        x, w, b)
    for n, a, c in zip("xwb", g2, g1, strict=True):
        assert_close(a, c, 1e-5, f"d{n}")
    # the public form builds the shard_map itself and returns the cache after the sequence
    y2, c2 = jax.jit(lambda x, w, b: parallel.short_conv(
        x, w, b, mesh=mesh_of(P_), activation="silu", initial_state=cache, segment_ids=seg))(
        x, w, b)
    assert_close(y2, y1, 1e-6, "parallel.short_conv output")
    assert_close(c2, c1, 1e-6, "parallel.short_conv cache")
