"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

    S_t = S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

and with `normalize=True`

    z_t = z_{t-1} + k_t,              o_t = scale * S_t^T q_t / (scale * q_t^T z_t + eps)

Shapes: q, k [B, T, Hk, K] (feature-mapped already, see `feature_maps`); v [B, T, H, V];
o [B, T, H, V] in v's dtype. The normaliser is an extra value column of ones: with
`normalize=True` the state is [B, H, K, V + 1] float32 whose last column is z.

This is `simple_gla` with no gate, so it runs on that op's recurrent, chunk and kernel paths: its
record names `kernels_of="simple_gla"`, and `impl` is resolved here (errors name this op) and the
choice handed to `simple_gla`.

Why z rides as a column of v rather than apart (a running sum of k beside a kernel call at V):
then numerator and denominator are sums of the very same rounded products q_t . k_s, whose errors
cancel in the ratio. Where the kernel can cancel to ~0 (ReBased's (z_q . z_k)^2 through signed
features), z computed apart left the gradients of q and k at 0.38 relative error against float64
where the column gives 1.5e-3 (`test_normaliser_shares_the_numerators_products`). The price is
one value column (V + 1, padded by the kernels).

The column is in v's dtype, except float16, whose range the unnormalised numerator outgrows
(float32 then): bfloat16 inputs reach the kernels as bfloat16. A float32 column made every
kernel input float32, and the Triton kernels then multiply in IEEE float32 on the CUDA cores:
Based's MQAR step at d512 took ~5 s on an H100 that way. Where the kernel stays away from 0
(Based's Taylor kernel >= 1/2, elu + 1) bfloat16 is within bfloat16's tolerance of float64
(`test_normalised_bfloat16_positive_kernel_against_float64`); where it cancels, the gradients of
q and k lose accuracy in bfloat16 (6.6e-2 on the draw above, 1.6e-3 in float32), so a caller with
such features passes float32 (the ReBased layer does).
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.dtypes import kernel_values_dtype
from linear_jax.ops.simple_gla import simple_gla

registry.register(registry.OpRecord(
    "linear_attention", kernels_of="simple_gla",
    seq_parallel="linear_jax.parallel.decay:linear_attention"))


def linear_attention(q, k, v, *, normalize=False, eps=1e-6, scale=None, initial_state=None,
                     segment_ids=None, chunk_size=64, impl="auto", config=None):
    """Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)` ([B,H,K,V+1] with normalize).

    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    B, T, H, K, V = _checks.check_qkv("linear_attention", q, k, v)
    if normalize:
        _checks.check_state("initial_state", initial_state, (B, H, K, V + 1), "[B, H, K, V + 1]")
    v_in = with_ones_column(v) if normalize else v
    choice = registry.resolve("linear_attention", impl, T, config, args=(q, k, v_in))
    o, S = simple_gla(q, k, v_in, None, initial_state=initial_state, scale=scale,
                      segment_ids=segment_ids, chunk_size=chunk_size, impl=choice.impl,
                      config=choice.config)
    return (normalised(o, V, eps, v.dtype) if normalize else o), S


def with_ones_column(v):
    """[v, 1] along the value axis: the normaliser's column, in v's dtype (float32 for float16)."""
    dtype = kernel_values_dtype(v.dtype)
    return jnp.concatenate([v.astype(dtype), jnp.ones(v.shape[:-1] + (1,), dtype)], axis=-1)


def normalised(o, V, eps, dtype):
    """The ratio of the numerator columns o[..., :V] to the normaliser column o[..., V], in
    float32, cast to `dtype`."""
    o = o.astype(jnp.float32)
    return (o[..., :V] / (o[..., V:] + eps)).astype(dtype)
