"""The causal depthwise short convolution that most linear mixers put before their recurrence
(H3, Mamba, DeltaNet, Gated DeltaNet): a thin module over `linear_jax.ops.short_conv`.

Parameters: width * dim (+ dim with a bias). The decoding state is the last `width - 1` inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import param
from linear_jax.parallel.dispatch import short_conv


class ShortConv(nnx.Module):
    """Depthwise causal convolution over time, `x [B, T, dim] -> (y [B, T, dim], state)`.

    `state` is `[B, width - 1, dim]` (the previous inputs; zeros at the start). The weight is
    initialised like PyTorch's Conv1d (uniform in +-1/sqrt(width)), as Mamba and fla do.
    """

    def __init__(self, dim: int, width: int = 4, *, activation: str | None = "silu",
                 use_bias: bool = False, axis: str = "heads", rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        self.dim, self.width, self.activation, self.dtype = dim, width, activation, dtype
        bound = width ** -0.5
        uniform = lambda key, shape, dt: nnx.initializers.uniform(2 * bound)(key, shape, dt) - bound
        self.weight = param(rngs, uniform, (width, dim), ("conv", axis), param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (dim,), (axis,), param_dtype)
                     if use_bias else None)

    def __call__(self, x, *, segment_ids=None, state=None, seq_parallel=None):
        """`seq_parallel` (a `linear_jax.parallel.SeqParallel`): x split along T over its mesh,
        each shard receiving the last `width - 1` inputs of the previous one (a halo)."""
        dtype = self.dtype or x.dtype
        bias = None if self.bias is None else self.bias[...].astype(dtype)

        # The op computes in float32 and autodiff would keep its W masked taps, their sum and the
        # activation, all float32 [B, T, dim]: 6 of the 10.5 GiB a Gated DeltaNet layer kept at
        # B T = 32k, d_model = 1024 (dim = 4096). Recomputing the conv, a few multiply-adds per
        # element, keeps only its input, in the compute dtype.
        @jax.checkpoint
        def conv(x, weight, bias, state, segment_ids):
            return short_conv(x, weight, bias, activation=self.activation, initial_state=state,
                              segment_ids=segment_ids, seq_parallel=seq_parallel)

        return conv(x.astype(dtype), self.weight[...].astype(dtype), bias, state, segment_ids)

    def init_state(self, batch_size: int, dtype=jnp.float32):
        return jnp.zeros((batch_size, self.width - 1, self.dim), dtype)
