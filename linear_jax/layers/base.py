"""The body shared by the query/key/value token mixers; a mixer supplies only its recurrence.

    q, k, v = x W_q, x W_k, x W_v                    [B, T, Hk*K], [B, T, n*Hk*K], [B, T, n*H*V]
    q, k, v = silu(conv(q)), silu(conv(k)), ...      optional depthwise short convolution
    o, S    = mix(x, q, k, v, S)                     the mixer: gates from x, feature maps, one op
    o       = RMSNorm_V(o) [* act(x W_g)]            optional per-head output norm and gate
    y       = o W_o

H value heads of dim V, Hk key heads of dim K (H a multiple of Hk: grouped heads), n keys and values
per token (n = 1 except DeltaProduct). Parameters: D (Hk K + n Hk K + n H V) projections
+ H V D out + (H V D gate) + (V norm) + (W (Hk K + n Hk K + n H V) conv).

The cache holds the mixer's state(s) (float32, `init_states`), the conv state (`conv`) and the last
segment id (`seg`); `__call__` starts from it and returns the next one, so a prefill is a call with
an empty cache and a decode step is a call on one token.

Sequence parallelism: `__call__(..., seq_parallel=SeqParallel(mesh))` runs the short conv and the
mixer's op split along T over the mesh axis (`linear_jax.parallel.dispatch`): a mixer calls its op
only through `recurrence(name, ..., seq_parallel=seq_parallel)`. A mixer whose op has no parallel
form sets `SEQ_PARALLEL = False` and raises when called with an active one.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import (
    DEFAULT_STD,
    RMSNorm,
    begin,
    dense,
    heads,
    leave,
    merge_heads,
    new_seg,
    op_kw,
    out_std,
)
from linear_jax.layers.short_conv import ShortConv
from linear_jax.parallel import dispatch


class QKVMixer(nnx.Module):
    """Base of the linear-attention family. Subclasses implement `mix` (and `init_states` when
    their state is not one `[B, H, K, V]` array). `chunk_size`, `impl` and `kernel_config` (a
    kernel config or a tuple of them, hashable) reach the op as `chunk_size=`, `impl=`,
    `config=` through `op_kw`."""

    SEQ_PARALLEL = True      # whether `mix` runs sequence-parallel (through `recurrence`)
    OP_IMPL = True           # `impl` is its op's (`linear_jax.ops.registry`)

    def __init__(self, d_model: int, num_heads: int, *, key_dim: int, value_dim: int,
                 num_kv_heads: int | None = None, steps: int = 1, conv_size: int = 0,
                 output_norm: bool = True, output_gate: bool = False,
                 gate_activation=jax.nn.silu, norm_eps: float = 1e-6, chunk_size: int = 64,
                 impl: str = "auto", kernel_config=None, num_layers: int | None = None,
                 std: float = DEFAULT_STD, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        H, Hk = num_heads, num_kv_heads or num_heads
        if H % Hk:
            raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={Hk}")
        self.d_model, self.H, self.Hk, self.K, self.V, self.steps = d_model, H, Hk, key_dim, \
            value_dim, steps
        self.std = std           # the init std a subclass gives its own (gate) projections
        self.op_kw = op_kw(chunk_size, impl, kernel_config)
        self.dims = (Hk * key_dim, steps * Hk * key_dim, steps * H * value_dim)
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = mk(d_model, self.dims[0], ("embed", "heads"), std=std)
        self.k_proj = mk(d_model, self.dims[1], ("embed", "heads"), std=std)
        self.v_proj = mk(d_model, self.dims[2], ("embed", "heads"), std=std)
        self.conv = (ShortConv(sum(self.dims), conv_size, activation="silu", rngs=rngs,
                               dtype=dtype, param_dtype=param_dtype) if conv_size else None)
        self.g_proj = mk(d_model, H * value_dim, ("embed", "heads"), std=std) if output_gate \
            else None
        self.gate_activation = gate_activation
        self.o_norm = (RMSNorm(value_dim, eps=norm_eps, axis="kv", rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype, activation=gate_activation)
                       if output_norm else None)
        self.o_proj = mk(H * value_dim, d_model, ("heads", "embed"), std=out_std(std, num_layers))

    # -- what a mixer supplies -------------------------------------------------------------------
    def mix(self, x, q, k, v, states: dict, segment_ids, seq_parallel=None):
        """q [B,T,Hk,K], k [B,T,n*Hk,K], v [B,T,n*H,V] -> (o [B,T,H,V], new states dict).
        The op is called through `recurrence(name, ..., seq_parallel=seq_parallel)`."""
        raise NotImplementedError

    def init_states(self, batch_size: int) -> dict:
        return {"state": jnp.zeros((batch_size, self.H, self.K, self.V), jnp.float32)}

    # -- shared ----------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        cache = {**self.init_states(batch_size), "seg": new_seg(batch_size)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_state(batch_size, dtype)
        return cache

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        if not self.SEQ_PARALLEL:
            dispatch.unsupported(self, seq_parallel)
        cache, states = begin(self, x, cache, segment_ids)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new = {}
        if self.conv is not None:
            conv_state = states.pop("conv").astype(q.dtype)
            qkv, new["conv"] = self.conv(jnp.concatenate([q, k, v], -1), segment_ids=segment_ids,
                                         state=conv_state, seq_parallel=seq_parallel)
            q, k, v = jnp.split(qkv, [self.dims[0], self.dims[0] + self.dims[1]], axis=-1)
        o, mixed = self.mix(x, heads(q, self.Hk), heads(k, self.steps * self.Hk),
                            heads(v, self.steps * self.H), states, segment_ids,
                            seq_parallel=seq_parallel)
        return self.output(o, x), leave(cache, segment_ids, **mixed, **new)

    def output(self, o, x):
        gate = None if self.g_proj is None else heads(self.g_proj(x), self.H)
        if self.o_norm is not None:
            o = self.o_norm(o, gate)
        elif gate is not None:
            o = o * self.gate_activation(gate)
        return self.o_proj(merge_heads(o))
