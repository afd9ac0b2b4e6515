"""Griffin's recurrent block around the RG-LRU (De et al. 2024, "Griffin: Mixing Gated Linear
Recurrences with Local Attention for Efficient Language Models"; the recurrent layers of
RecurrentGemma and Hawk).

    y    = gelu_tanh(x W_y + b_y)                        the gate branch, [B, T, W]
    u    = conv(x W_x + b_x)                             depthwise causal, with bias, no activation
    r_t  = sigmoid(u_t W_a + b_a)                        recurrence gate  } block-diagonal W_a, W_i:
    i_t  = sigmoid(u_t W_i + b_i)                        input gate       } H blocks of W / H
    log a_t = -c softplus(Lambda) r_t                    c = 8, Lambda per channel
    h_t  = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)       the RG-LRU, element-wise over W
    out  = (h * y) W_o + b_o

The recurrence is `linear_jax.ops.diagonal_scan` with transitions a_t and inputs
sqrt(1 - a_t^2) i_t u_t. At the first token of a document (of the stream, or after a change of
segment id) the state restarts from zero and the input is not normalised (multiplier 1), as
RecurrentGemma does at position 0; the square root's derivative is capped at 1000 (theirs too:
as a_t -> 1 it diverges, which gives NaNs in bfloat16 training). Lambda starts with
a_t^(1/(c r_t)) = exp(-softplus(Lambda)) in [0.9, 0.999], Griffin's initialisation.

Sequence parallelism (`seq_parallel=`): the conv takes its halo from the previous shard, the scan
runs `linear_jax.parallel.diagonal_scan`; the document starts (and so the unnormalised first
input) are computed on the T-split ids as a whole, so a document starting on a shard boundary
keeps the rule.

Parameters: 3 D W + 2 W^2 / H + (conv_size + 6) W + D. Cache: the state h [B, W] float32, the conv
state, `open` [B] (whether the current document has begun; zeroed with the states at a
boundary) and `seg`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import (
    DEFAULT_STD,
    dense,
    enter,
    heads,
    inv_softplus,
    leave,
    new_seg,
    out_std,
    param,
)
from linear_jax.layers.short_conv import ShortConv
from linear_jax.parallel import dispatch

MAX_SQRT_GRADIENT = 1000.0


@jax.custom_jvp
def _sqrt_bounded(z):
    return jnp.sqrt(z)


@_sqrt_bounded.defjvp
def _sqrt_bounded_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return jnp.sqrt(z), dz / jnp.sqrt(jnp.maximum(4.0 * z, MAX_SQRT_GRADIENT ** -2))


def _lambda_init(key, shape, dtype):
    a = jnp.sqrt(jax.random.uniform(key, shape, jnp.float32, 0.9 ** 2, 0.999 ** 2))
    return inv_softplus(-jnp.log(a)).astype(dtype)


class RGLRU(nnx.Module):
    SEQ_PARALLEL = True
    OP_IMPL = True           # `impl` is its op's (`linear_jax.ops.registry`)

    def __init__(self, d_model: int, num_heads: int, *, lru_width: int | None = None,
                 conv_size: int = 4, c: float = 8.0, chunk_size: int = 64, impl: str = "auto",
                 kernel_config=None, num_layers: int | None = None, std: float = DEFAULT_STD,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        W = lru_width or d_model
        if W % num_heads:
            raise ValueError(f"RGLRU: num_heads={num_heads} must divide lru_width={W} (the "
                             f"gates are block-diagonal)")
        self.W, self.H, self.c = W, num_heads, c
        # hashable: static graph data
        self.op_kw = (("chunk_size", chunk_size), ("impl", impl), ("config", kernel_config))
        mk = partial(dense, rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=True)
        self.y_proj = mk(d_model, W, ("embed", "heads"), std=std)
        self.x_proj = mk(d_model, W, ("embed", "heads"), std=std)
        self.conv = ShortConv(W, conv_size, activation=None, use_bias=True, rngs=rngs,
                              dtype=dtype, param_dtype=param_dtype)
        n = W // num_heads
        block = lambda: param(rngs, nnx.initializers.normal(std), (num_heads, n, n),
                              ("heads", "kv", None), param_dtype)
        bias = lambda: param(rngs, nnx.initializers.zeros, (num_heads, n), ("heads", "kv"),
                             param_dtype)
        self.input_gate_weight, self.input_gate_bias = block(), bias()
        self.recurrent_gate_weight, self.recurrent_gate_bias = block(), bias()
        self.recurrent_param = param(rngs, _lambda_init, (W,), ("heads",), param_dtype)
        self.o_proj = mk(W, d_model, ("heads", "embed"), std=out_std(std, num_layers))

    def init_cache(self, batch_size: int, dtype=jnp.float32, **_) -> dict:
        return {"state": jnp.zeros((batch_size, self.W), jnp.float32),
                "conv": self.conv.init_state(batch_size, dtype),
                "open": jnp.zeros((batch_size,), bool), "seg": new_seg(batch_size)}

    def _gate(self, u, weight, bias):
        """sigmoid(u W + b) with W block-diagonal: u [B, T, W] float32 -> [B, T, W]."""
        f32 = lambda p: p[...].astype(jnp.float32)
        z = jnp.einsum("bthi,hij->bthj", heads(u, self.H), f32(weight)) + f32(bias)
        return jax.nn.sigmoid(z).reshape(u.shape)

    def __call__(self, x, *, segment_ids=None, cache=None, seq_parallel=None):
        B, T, _ = x.shape
        cache = self.init_cache(B, x.dtype) if cache is None else cache
        states = enter(cache, segment_ids)
        y = jax.nn.gelu(self.y_proj(x), approximate=True)
        u, conv = self.conv(self.x_proj(x), segment_ids=segment_ids,
                            state=states["conv"].astype(x.dtype), seq_parallel=seq_parallel)
        u = u.astype(jnp.float32)
        i = self._gate(u, self.input_gate_weight, self.input_gate_bias)
        r = self._gate(u, self.recurrent_gate_weight, self.recurrent_gate_bias)
        log_a = -self.c * r * jax.nn.softplus(self.recurrent_param[...].astype(jnp.float32))
        later = (jnp.zeros((B, T - 1), bool) if segment_ids is None
                 else segment_ids[:, 1:] != segment_ids[:, :-1])
        start = jnp.concatenate([~states["open"][:, None], later], 1)      # document starts
        # -expm1: 1 - a^2 without cancellation as a -> 1
        norm = jnp.where(start[..., None], 1.0, _sqrt_bounded(-jnp.expm1(2.0 * log_a)))
        h, state = dispatch.recurrence(
            "diagonal_scan", jnp.exp(log_a), norm * i * u, initial_state=states["state"],
            segment_ids=segment_ids, seq_parallel=seq_parallel, **dict(self.op_kw))
        out = self.o_proj(h.astype(y.dtype) * y)
        return out, leave(cache, segment_ids, state=state, conv=conv, open=jnp.ones((B,), bool))
