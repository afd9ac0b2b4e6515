"""Simple gated linear attention: one scalar log-decay per head and step.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V] (H a multiple of Hk); g [B, T, H] with g <= 0;
state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.

This is RetNet's retention and Lightning Attention (TNL) with a constant g per head
(Sun et al. 2023, "Retentive Network"; Qin et al. 2024, "Scaling Laws for Linear Complexity
Language Models"), and Mamba-2's SSD with g = dt * A (Dao & Gu 2024, "Transformers are SSMs").

impl: "recurrent" (lax.scan reference), "chunk" (chunk-parallel XLA; see
`linear_jax.ops.common.decay_chunk`), "pallas" / "pallas:<backend>" (the kernels of the record
below), "auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.decay_chunk import chunk_decay
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros


def simple_gla_recurrent(q, k, v, g, *, scale, initial_state, segment_ids):
    """The reference: one step per token. Inputs already validated, heads expanded."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = state_or_zeros(initial_state, (B, H, K, V))
    g = jnp.zeros((B, T, H), jnp.float32) if g is None else f32(g)

    def step(S, x):
        q_t, k_t, v_t, g_t = x
        S = jnp.exp(g_t)[..., None, None] * S + k_t[..., :, None] * v_t[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S, precision="highest")

    return scan_time(step, S0, (f32(q) * scale, f32(k), f32(v), g), segment_ids)


def simple_gla_chunk(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    return chunk_decay(q, k, v, g, scale=scale, initial_state=initial_state,
                       segment_ids=segment_ids, chunk_size=chunk_size)


registry.register(registry.OpRecord(
    "simple_gla", reference=simple_gla_recurrent, chunk=simple_gla_chunk,
    # the Hopper kernel (gates="xla", the config's default) passed its device checks on an H200
    # and beats the Triton kernel at every anchor shape, fwd and fwd+bwd (benchmarks/NOTES.md,
    # session 8): "auto" takes it on sm_90
    kernels=(registry.Kernel("mosaic_gpu", "linear_jax.kernels.gpu.hopper.decay:simple_gla",
                             "linear_jax.kernels.configs:HopperChunkConfig",
                             min_capability=(9, 0), max_capability=(9, 0),
                             accepts="linear_jax.kernels.gpu.hopper.common:accepts"),
             registry.Kernel("triton", "linear_jax.kernels.gpu.decay:decay",
                             "linear_jax.kernels.configs:TritonChunkConfig",
                             accepts="linear_jax.kernels.gpu.common:accepts",
                             auto_declines="linear_jax.kernels.gpu.common:auto_declines"),
             registry.Kernel("tpu", "linear_jax.kernels.tpu.simple_gla:simple_gla",
                             "linear_jax.kernels.configs:TpuConfig")),
    seq_parallel="linear_jax.parallel.decay:simple_gla"))


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, chunk_size=64,
               impl="auto", config=None):
    """Scalar-gated linear attention. Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)`.

    `g` may be None (no decay: plain linear attention).
    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    B, T, H, K, V = _checks.check_qkv("simple_gla", q, k, v)
    if g is not None:
        _checks.check_gate("simple_gla", "g", g, B, T, H)
        _checks.check_log_decay("g", g)
    _checks.check_state("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("simple_gla", impl, T, config, args=(q, k, v))
    q, k = repeat_heads(q, H), repeat_heads(k, H)
    o, S = run(q, k, v, g, scale=default_scale(scale, K), initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), S
