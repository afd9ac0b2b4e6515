"""Kimi Delta Attention (KDA): the gated delta rule with a per-channel decay.

    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t

The state is decayed first, channel by channel (GLA's gate), then edited by the delta rule, as in
Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Hybrid Linear Attention Architecture" (the
order of its reference recurrence in flash-linear-attention). With a gate constant over the key
channels it is `gated_delta_rule`. Keys are expected l2-normalised, beta in [0, 1] (or [0, 2] for
negative eigenvalues, as for the delta rule).

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V] (H a multiple of Hk); g [B, T, H, K] with g <= 0;
beta [B, T, H]; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.

impl: "recurrent" (lax.scan reference), "chunk" (the delta rule's chunk-parallel WY/UT form with
GLA-style sub-chunked per-channel decays inside the chunk, `linear_jax.ops.common.delta_chunk`),
"pallas" / "pallas:triton" (the Triton kernels of the gated delta rule with a vector gate,
`linear_jax.kernels.gpu.delta`), "auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.delta_chunk import chunk_delta
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros


def kda_recurrent(q, k, v, g, beta, *, scale, initial_state, segment_ids):
    """The reference: one step per token. Inputs validated, heads expanded."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = state_or_zeros(initial_state, (B, H, K, V))

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t = x
        S = jnp.exp(g_t)[..., :, None] * S
        # (I - b k k^T) S + b k v^T  ==  S + b k (v - k^T S)^T, on the decayed state
        err = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, S, precision="highest")
        S = S + b_t[..., None, None] * k_t[..., :, None] * err[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S, precision="highest")

    return scan_time(step, S0, (f32(q) * scale, f32(k), f32(v), f32(g), f32(beta)), segment_ids)


def kda_chunk(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size):
    return chunk_delta(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                       segment_ids=segment_ids, chunk_size=chunk_size)


# the gated delta rule's Triton kernels, with the gate kind taken from g's rank
registry.register(registry.OpRecord(
    "kda", reference=kda_recurrent, chunk=kda_chunk,
    # check_gpu's full grid passes (H200 sessions 8 and 11, H100 session 17) and the kernels beat
    # the chunk form 5x forward and 13x fwd+bwd at T = 2048 on an H100 (benchmarks/NOTES.md)
    kernels=(registry.Kernel("triton", "linear_jax.kernels.gpu.delta:delta",
                             "linear_jax.kernels.configs:TritonChunkConfig",
                             accepts="linear_jax.kernels.gpu.common:accepts",
                             auto_declines="linear_jax.kernels.gpu.common:auto_declines"),),
    seq_parallel="linear_jax.parallel.rank_one:kda"))


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, chunk_size=64,
        impl="auto", config=None):
    """KDA. Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)`.

    `g [B, T, H, K] <= 0`: the per-channel log decay applied to the state before each step;
    `beta [B, T, H]`: the writing strength. `config`: a kernel config of
    `linear_jax.kernels.configs` or a tuple of them (the kernel that runs takes the one of its
    type; None: the device's defaults); the XLA forms ignore it.
    """
    B, T, H, K, V = _checks.check_qkv("kda", q, k, v)
    _checks.check_gate("kda", "g", g, B, T, H, K)
    _checks.check_log_decay("g", g)
    _checks.check_gate("kda", "beta", beta, B, T, H)
    _checks.check_state("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("kda", impl, T, config, args=(q, k, v))
    q, k = repeat_heads(q, H), repeat_heads(k, H)
    o, S = run(q, k, v, g, beta, scale=default_scale(scale, K), initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), S
