"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    S_t = S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

and with `normalize=True`

    z_t = z_{t-1} + k_t,              o_t = scale * S_t^T q_t / (scale * q_t^T z_t + eps)

Shapes: q, k [B, T, Hk, K] (feature-mapped already, see `feature_maps`); v [B, T, H, V];
o [B, T, H, V] in v's dtype. With `normalize=True` the state is [B, H, K, V + 1] float32 whose
last column is z (z is S's column for a value of ones).

This is `simple_gla` with no gate, so it runs on that op's recurrent, chunk and kernel paths: its
record names `kernels_of="simple_gla"`, and `impl` is resolved here (errors name this op) and the
choice handed to `simple_gla`. The normaliser does not go through that op as a column of ones
appended to v: that would hand the kernels V + 1 float32 values (Based at V = 64 pads 65 to 80
and cuts five value tiles where 64 is one; bf16 would never reach the Hopper kernels, which take
16-bit inputs only). z is a running sum of k, an element-wise scan (`chunk_scan` with a = 1),
computed apart in float32; the numerator goes through `simple_gla` at V in v's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.elementwise_chunk import chunk_scan
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.simple_gla import simple_gla

registry.register(registry.OpRecord(
    "linear_attention", kernels_of="simple_gla",
    seq_parallel="linear_jax.parallel.decay:linear_attention"))


def normaliser(q, k, *, scale, initial_state, segment_ids, chunk_size):
    """(scale * q_t^T z_t [B, T, H], z_T [B, H, K]) in float32, z_t = z_{t-1} + k_t from
    `initial_state` [B, H, K] (None: zeros), reset at a segment's start; q, k [B, T, H, K]."""
    k = k.astype(jnp.float32)
    z, zT = chunk_scan(jnp.ones_like(k), k, initial_state=initial_state, segment_ids=segment_ids,
                       chunk_size=chunk_size)
    den = scale * jnp.einsum("bthk,bthk->bth", q.astype(jnp.float32), z, precision="highest")
    return den, zT


def linear_attention(q, k, v, *, normalize=False, eps=1e-6, scale=None, initial_state=None,
                     segment_ids=None, chunk_size=64, impl="auto", config=None):
    """Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)` ([B,H,K,V+1] with normalize).

    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    B, T, H, K, V = _checks.check_qkv("linear_attention", q, k, v)
    S0, out_dtype = initial_state, v.dtype
    if normalize:
        _checks.check_state("initial_state", initial_state, (B, H, K, V + 1), "[B, H, K, V + 1]")
        _checks.check_segment_ids(segment_ids, B, T)
        _checks.check_chunk_size(chunk_size)
        S0 = None if initial_state is None else initial_state[..., :V]
        # float16's range cannot hold the unnormalised numerator, which grows with T
        v = v.astype(jnp.float32) if v.dtype == jnp.float16 else v
    choice = registry.resolve("linear_attention", impl, T, config, args=(q, k, v))
    o, S = simple_gla(q, k, v, None, initial_state=S0, scale=scale, segment_ids=segment_ids,
                      chunk_size=chunk_size, impl=choice.impl, config=choice.config)
    if not normalize:
        return o, S
    den, zT = normaliser(repeat_heads(q, H), repeat_heads(k, H), scale=default_scale(scale, K),
                         initial_state=None if initial_state is None else initial_state[..., V],
                         segment_ids=segment_ids, chunk_size=chunk_size)
    o = o.astype(jnp.float32) / (den[..., None] + eps)
    return o.astype(out_dtype), jnp.concatenate([S, zT[..., None]], axis=-1)
