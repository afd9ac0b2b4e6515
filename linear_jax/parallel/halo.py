"""Sequence-parallel short causal convolution (`linear_jax.ops.short_conv`) with a halo.

A causal convolution of width W at the start of shard p reads the last W-1 inputs of shard p-1.
They are exactly the cache `short_conv` takes as its initial state, so each shard sends its last
W-1 inputs to the next with one `ppermute` (shard 0 receives nothing and uses the caller's cache,
or zeros) and runs the single-device op from that cache. Autodiff transposes the `ppermute` into
the reverse one.

Packed documents: the halo holds zeros at positions of an earlier document than the sending
shard's last token (what `short_conv` returns as its cache), and the receiving shard drops it
when a document starts exactly at its first token (the first id differs from the previous
shard's last id, sent along in the same `ppermute`, its bits reinterpreted as a float).

`halo_short_conv` works on the local shard inside a `shard_map`; `short_conv(..., mesh=)` builds
the `shard_map` around it (what the layers reach through `linear_jax.parallel.dispatch`), and
without `mesh` is `halo_short_conv`. Public as `linear_jax.parallel.short_conv`; this module is
`linear_jax.parallel.halo`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from linear_jax import _compat
from linear_jax.ops.common.chunking import doc_index
from linear_jax.ops.short_conv import short_conv as _short_conv
from linear_jax.parallel.mesh import BATCH_AXES, _axes


def halo_short_conv(x, weight, bias=None, *, axis_name="seq", activation=None,
                    initial_state=None, segment_ids=None, impl="auto"):
    """`short_conv` on the local shard of a sequence split along `axis_name`; call inside
    `shard_map`. x [B,T_loc,D] with T_loc >= W-1; initial_state [B,W-1,D] is the cache before
    the whole sequence (used on shard 0). Returns (y [B,T_loc,D], this shard's cache
    [B,W-1,D] float32): the cache after the whole sequence is the one on the last shard."""
    B, T, D = x.shape
    W = weight.shape[0]
    if W == 1:
        return _short_conv(x, weight, bias, activation=activation, segment_ids=segment_ids,
                           impl=impl)
    if T < W - 1:
        raise ValueError(f"halo_short_conv: each shard needs at least W-1={W - 1} tokens, "
                         f"got x{tuple(x.shape)}")
    P = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    tail = x[:, T - (W - 1):].astype(jnp.float32)
    if segment_ids is not None:
        doc = doc_index(segment_ids)
        tail = jnp.where((doc[:, T - (W - 1):] == doc[:, -1:])[..., None], tail, 0.0)
        # the last id rides along, its bits reinterpreted as a float (exact)
        last = lax.bitcast_convert_type(segment_ids[:, -1:].astype(jnp.int32), jnp.float32)
        tail = jnp.concatenate([tail, jnp.broadcast_to(last[..., None], (B, 1, D))], 1)
    halo = lax.ppermute(tail, axis_name, [(i, i + 1) for i in range(P - 1)])
    cache = halo[:, : W - 1]
    if segment_ids is not None:
        prev_last = lax.bitcast_convert_type(halo[:, W - 1, 0], jnp.int32)
        fresh = segment_ids[:, 0].astype(jnp.int32) != prev_last
        cache = jnp.where(fresh[:, None, None], 0.0, cache)
    if initial_state is not None:
        cache = jnp.where(idx == 0, initial_state.astype(jnp.float32), cache)
    else:
        cache = jnp.where(idx == 0, 0.0, cache)
    return _short_conv(x, weight, bias, activation=activation, initial_state=cache,
                       segment_ids=segment_ids, impl=impl)


def short_conv(x, weight, bias=None, *, axis_name="seq", mesh=None, batch_axes=None,
               activation=None, initial_state=None, segment_ids=None, impl="auto"):
    """Sequence-parallel `linear_jax.ops.short_conv`. With `mesh=` it builds the `shard_map`
    around `halo_short_conv`: x [B,T,D] and segment_ids [B,T] split as P(batch, seq), the weight,
    bias and channels replicated, initial_state [B,W-1,D] as P(batch); returns (y [B,T,D], the
    cache after the whole sequence [B,W-1,D] float32), as `ops.short_conv`. With `mesh=None`,
    inside your `shard_map`: `halo_short_conv` (each shard's own cache)."""
    if mesh is None:
        return halo_short_conv(x, weight, bias, axis_name=axis_name, activation=activation,
                               initial_state=initial_state, segment_ids=segment_ids, impl=impl)
    T, W, n = x.shape[1], weight.shape[0], mesh.shape[axis_name]
    if T % n or T // n < W - 1:
        raise ValueError(f"short_conv: T={T} must be a multiple of the size {n} of the mesh axis "
                         f"{axis_name!r}, with at least W-1={W - 1} tokens per shard")
    b = _axes(mesh, batch_axes, BATCH_AXES)
    x_spec, rows = P(b, axis_name), P(b)

    def body(x, weight, bias, init, seg):
        y, cache = halo_short_conv(x, weight, bias, axis_name=axis_name, activation=activation,
                                   initial_state=init, segment_ids=seg, impl=impl)
        return y, cache[:, None]                       # each shard's cache, stacked along seq

    spec = lambda a, s: None if a is None else s
    f = _compat.shard_map(body, mesh=mesh, in_specs=(
        x_spec, P(), spec(bias, P()), spec(initial_state, rows), spec(segment_ids, x_spec)),
        out_specs=(x_spec, x_spec))
    y, caches = f(x, weight, bias, initial_state, segment_ids)
    return y, caches[:, -1]
