"""Building blocks every mixer shares: parameters with logical axis names, dense projections,
RMS norms (plain, per head, gated) and the cache bookkeeping for packed documents.

Logical axes: `embed` (model width), `heads` (heads x head dim, fused), `kv` (one head's dim),
`mlp` (feed-forward width), `vocab`, `experts`, `conv` (short-conv taps). Parameters carry them as
sharding metadata and are created unsharded; a training harness maps names onto mesh axes with its
rules (`nnx.get_partition_spec` on the abstract state, then a logical -> mesh table).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.ops.norms import gated_rms_norm, rms_norm

# Shardings are applied by the harness from the axis names, never at creation (which would need a
# mesh in scope just to build a layer on one device).
_META = {"eager_sharding": False}
DEFAULT_STD = 0.02


def param(rngs: nnx.Rngs, init, shape, axes, param_dtype) -> nnx.Param:
    """A parameter of `shape` drawn from `init` with logical axis names `axes`."""
    return nnx.Param(init(rngs.params(), shape, param_dtype), out_sharding=tuple(axes), **_META)


def dense(d_in: int, d_out: int, axes, *, rngs, dtype, param_dtype, std=DEFAULT_STD,
          use_bias=False, bias_init=nnx.initializers.zeros) -> nnx.Linear:
    """`nnx.Linear` with a normal(std) kernel named `axes` (std=0 gives a zero kernel)."""
    kinit = nnx.initializers.zeros if std == 0 else nnx.initializers.normal(std)
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(kinit, tuple(axes), **_META),
        bias_init=nnx.with_partitioning(bias_init, (axes[-1],), **_META),
    )


def out_std(std: float, num_layers: int | None) -> float:
    """GPT-2 / fla scaling of residual-branch output projections: std / sqrt(2 L)."""
    return std if not num_layers else std / math.sqrt(2 * num_layers)


class RMSNorm(nnx.Module):
    """RMS norm over the last axis with a learned scale (`axis` names the scale's logical axis).

    Applied to [B, T, H, V] it normalises each head separately with one scale shared by the heads
    (the group norm of GLA / RetNet outputs). `gate` (optional) multiplies the normalised value by
    `activation(gate)` (GLA's swish output gate, xLSTM's sigmoid one). `offset`: the scale is
    stored as `scale - offset` (see `weight`). Parameters: dim.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, axis: str = "embed", rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32, activation=jax.nn.silu,
                 offset: float = 0.0):
        self.eps, self.dtype, self.activation, self.offset = eps, dtype, activation, offset
        init = nnx.initializers.ones if offset == 0 else nnx.initializers.constant(1 - offset)
        self.scale = param(rngs, init, (dim,), (axis,), param_dtype)

    def weight(self):
        """The effective scale, float32: `offset + scale` (zero-centred norms store scale - 1,
        e.g. Qwen3-Next's, so a low-precision scale keeps its small deviations from one)."""
        w = self.scale[...].astype(jnp.float32)
        return w if self.offset == 0 else self.offset + w

    def __call__(self, x, gate=None):
        dtype, eps, activation = self.dtype or x.dtype, self.eps, self.activation

        # The norm computes in float32: autodiff would keep float32 copies of x, of the
        # normalised x and of the gate's activation (two to seven [B, T, dim] float32 arrays per
        # norm); recomputing it in the backward keeps x and gate in their own dtype only.
        @jax.checkpoint
        def norm(x, gate, weight):
            if gate is not None and activation is jax.nn.silu:
                return gated_rms_norm(x, gate, weight, eps).astype(dtype)
            y = rms_norm(x.astype(jnp.float32), weight, eps)
            if gate is not None:
                y = y * activation(gate.astype(jnp.float32))
            return y.astype(dtype)

        return norm(x, gate, self.weight())


def heads(x, n: int):
    """[B, T, n * d] -> [B, T, n, d]."""
    return x.reshape(x.shape[:-1] + (n, x.shape[-1] // n))


def merge_heads(x):
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


# --- caches -------------------------------------------------------------------------------------
# A mixer's cache is a dict of arrays: its recurrent state(s), its short-conv state(s) and `seg`
# [B] int32, the segment id of the last token seen. Ops reset state only *inside* a call (never at
# t = 0), so a packed document that starts exactly at a call boundary is handled here: every state
# of a row is zeroed when the row's first new id differs from the cached one.


def enter(cache: dict, segment_ids):
    """The cache's states to start this call from (`seg` dropped), zeroed at a boundary reset."""
    states = {n: s for n, s in cache.items() if n != "seg"}
    if segment_ids is None:
        return states
    fresh = segment_ids[:, 0] != cache["seg"]

    def zero(s):
        return jnp.where(fresh.reshape((-1,) + (1,) * (s.ndim - 1)), jnp.zeros_like(s), s)
    return jax.tree.map(zero, states)


def leave(cache: dict, segment_ids, **states) -> dict:
    """The cache after this call: the new states and the last segment id."""
    seg = cache["seg"] if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)
    return {**states, "seg": seg}


def new_seg(batch_size: int):
    return jnp.zeros((batch_size,), jnp.int32)


def begin(layer, x, cache, segment_ids) -> tuple[dict, dict]:
    """(cache, states) a call of `layer` on x [B, T, D] starts from: `cache`, or the layer's
    `init_cache` when None, and its states after `enter`."""
    cache = layer.init_cache(x.shape[0], x.dtype) if cache is None else cache
    return cache, enter(cache, segment_ids)


def op_kw(chunk_size: int, impl: str, kernel_config) -> tuple:
    """What a layer keeps of its op's `chunk_size=`, `impl=` and `config=` and calls it with as
    `**dict(self.op_kw)`: pairs, hashable, so static graph data."""
    return (("chunk_size", chunk_size), ("impl", impl), ("config", kernel_config))


def inv_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


def a_log_init(key, shape, dtype):
    """log A with A uniform in [1, 16] (Mamba-2, Gated DeltaNet)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def dt_bias_init(key, shape, dtype):
    """dt_bias with softplus(dt_bias) log-uniform in [1e-3, 1e-1] (Mamba, Mamba-2)."""
    u = jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1))
    return inv_softplus(jnp.exp(u))


class DecayGate(nnx.Module):
    """Mamba-2's data-dependent log decay per head, g = -exp(A_log) * softplus(x W_a + dt_bias).

    A = exp(A_log) is drawn uniform in [1, 16] and dt = softplus(dt_bias) log-uniform in
    [1e-3, 1e-1], as in Mamba-2 and Gated DeltaNet. Parameters: D H + 2 H.
    """

    def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, std=DEFAULT_STD):
        H = num_heads
        self.A_log = param(rngs, a_log_init, (H,), ("heads",), param_dtype)
        self.dt_bias = param(rngs, dt_bias_init, (H,), ("heads",), param_dtype)
        self.proj = dense(d_model, H, ("embed", "heads"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype, std=std)

    def __call__(self, x):
        """x [B, T, D] -> g [B, T, H] float32, g <= 0."""
        a = self.proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        return -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
