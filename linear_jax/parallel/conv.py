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
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import doc_index
from linear_jax.ops.short_conv import short_conv


def halo_short_conv(x, weight, bias=None, *, axis_name="seq", activation=None,
                    initial_state=None, segment_ids=None, impl="auto"):
    """`short_conv` on the local shard of a sequence split along `axis_name`; call inside
    `shard_map`. x [B,T_loc,D] with T_loc >= W-1; initial_state [B,W-1,D] is the cache before
    the whole sequence (used on shard 0). Returns (y [B,T_loc,D], this shard's cache
    [B,W-1,D] float32): the cache after the whole sequence is the one on the last shard."""
    B, T, D = x.shape
    W = weight.shape[0]
    if W == 1:
        return short_conv(x, weight, bias, activation=activation, segment_ids=segment_ids,
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
    return short_conv(x, weight, bias, activation=activation, initial_state=cache,
                      segment_ids=segment_ids, impl=impl)
