"""What the backward keeps of the float32-computing pieces of a layer (short conv, RMS norms, the
MLP's activation): their inputs in the compute dtype, not float32 intermediates. Counted exactly
from the residuals of `jax.vjp` (shapes and dtypes under `eval_shape`, nothing runs), so the bounds
hold on every backend. Without the recomputation a 12-layer Gated DeltaNet at d_model 1024 and
32k tokens per step kept about 10 GiB per layer and did not fit an 80 GB GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import RMSNorm
from linear_jax.layers.ffn import MLP
from linear_jax.layers.short_conv import ShortConv

B, T, D = 2, 64, 96
BF16 = jnp.bfloat16


def _saved_bytes(module, *args, **kw) -> int:
    """Bytes of the residuals the backward of `module(*args, **kw)` keeps, over its parameters
    and `args`."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def f(p, *a):
        return jax.tree.leaves(nnx.merge(graphdef, p, rest)(*a, **kw))[0]

    leaves = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(f, *a)[1]), params, *args)
    return sum(x.size * x.dtype.itemsize for x in leaves)


def _nbytes(shape, dtype) -> int:
    return int(jnp.prod(jnp.array(shape))) * jnp.dtype(dtype).itemsize


def test_short_conv_keeps_its_input_only():
    W = 4
    x = jax.ShapeDtypeStruct((B, T, D), BF16)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    saved = _saved_bytes(ShortConv(D, W, rngs=nnx.Rngs(0), dtype=BF16), x, segment_ids=seg)
    # x, the weight (in either dtype) and the segment ids; the float32 form kept 2W + 3 float32
    # [B, T, D] arrays (24 times x)
    assert saved <= _nbytes(x.shape, BF16) + _nbytes((W, D), jnp.float32) + _nbytes(seg.shape,
                                                                                     jnp.int32)


def test_rms_norm_keeps_x_and_gate_in_their_dtype():
    x = jax.ShapeDtypeStruct((B, T, D), BF16)
    plain = _saved_bytes(RMSNorm(D, rngs=nnx.Rngs(0), dtype=BF16), x)
    assert plain <= _nbytes(x.shape, BF16) + _nbytes((D,), jnp.float32)

    H, V = 4, 32
    xh = jax.ShapeDtypeStruct((B, T, H, V), BF16)
    gated = _saved_bytes(RMSNorm(V, axis="kv", rngs=nnx.Rngs(0), dtype=BF16), xh, xh)
    # o and its gate; the float32 form kept seven float32 [B, T, H, V] arrays
    assert gated <= 2 * _nbytes(xh.shape, BF16) + _nbytes((V,), jnp.float32)


def test_mlp_keeps_its_projections_not_the_activation_internals():
    F = 256
    x = jax.ShapeDtypeStruct((B, T, D), BF16)
    saved = _saved_bytes(MLP(D, F, rngs=nnx.Rngs(0), dtype=BF16), x)
    # x, the gate and up projections and their product, and the three weights in bf16
    assert saved <= _nbytes(x.shape, BF16) + 3 * _nbytes((B, T, F), BF16) + 3 * _nbytes(
        (D, F), BF16)


def test_signed_mamba_keeps_no_per_state_tensor():
    """Mamba with eigenvalues in [-1, 1] runs its scan over E N channels: the backward keeps the
    scan's inputs and recomputes a, x and h, [B, T, E, N] float32 each (10.6 GiB of one
    state-tracking cell's train step when they were kept)."""
    from linear_jax.layers.mamba import Mamba

    d, N = 32, 16
    x = jax.ShapeDtypeStruct((B, T, d), jnp.float32)
    layer = Mamba(d, d_state=N, allow_neg_eigval=True, impl="chunk", rngs=nnx.Rngs(0))
    saved = _saved_bytes(layer, x)
    assert saved < _nbytes((B, T, 2 * d, N), jnp.float32), saved
