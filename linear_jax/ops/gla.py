"""Gated linear attention: a log-decay per head, step and key channel.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V] (H a multiple of Hk); g [B, T, H, K] with g <= 0;
state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.

Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training". With
k = 1 - exp(g) this is HGRN2's state expansion (Qin et al. 2024, "HGRN2: Gated Linear RNNs with
State Expansion").

impl: "recurrent" (lax.scan reference), "chunk" (chunk-parallel XLA with sub-chunked intra-chunk
blocks; see `linear_jax.ops.common.decay_chunk`), "pallas" / "pallas:<backend>" (the kernels of the
record below), "auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.decay_chunk import chunk_decay
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros


def gla_recurrent(q, k, v, g, *, scale, initial_state, segment_ids):
    """The reference: one step per token. Inputs already validated, heads expanded."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = state_or_zeros(initial_state, (B, H, K, V))

    def step(S, x):
        q_t, k_t, v_t, g_t = x
        S = jnp.exp(g_t)[..., :, None] * S + k_t[..., :, None] * v_t[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S, precision="highest")

    return scan_time(step, S0, (f32(q) * scale, f32(k), f32(v), f32(g)), segment_ids)


def gla_chunk(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    return chunk_decay(q, k, v, g, scale=scale, initial_state=initial_state,
                       segment_ids=segment_ids, chunk_size=chunk_size)


registry.register(registry.OpRecord(
    "gla", reference=gla_recurrent, chunk=gla_chunk,
    # the Hopper kernels pass their device checks (strong decay included, H100 sessions 17, 18)
    # and, with the gradient per key block, beat the Triton kernels on one H100 (session 18,
    # T = 2048, device ms: fwd 0.71 against 1.11, fwd+bwd 2.32 against 5.16): "auto" on sm_90
    kernels=(registry.Kernel("mosaic_gpu", "linear_jax.kernels.gpu.hopper.gla:gla",
                             "linear_jax.kernels.configs:HopperChunkConfig", auto=True,
                             min_capability=(9, 0), max_capability=(9, 0),
                             accepts="linear_jax.kernels.gpu.hopper.common:accepts"),
             registry.Kernel("triton", "linear_jax.kernels.gpu.decay:decay",
                             "linear_jax.kernels.configs:TritonChunkConfig",
                             accepts="linear_jax.kernels.gpu.common:accepts",
                             auto_declines="linear_jax.kernels.gpu.common:auto_declines"),
             registry.Kernel("tpu", "linear_jax.kernels.tpu.gla:gla",
                             "linear_jax.kernels.configs:TpuConfig")),
    seq_parallel="linear_jax.parallel.decay:gla"))


def gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, chunk_size=64,
        impl="auto", config=None):
    """Vector-gated linear attention. Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)`.

    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    B, T, H, K, V = _checks.check_qkv("gla", q, k, v)
    _checks.check_gate("gla", "g", g, B, T, H, K)
    _checks.check_log_decay("g", g)
    _checks.check_state("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("gla", impl, T, config, args=(q, k, v))
    q, k = repeat_heads(q, H), repeat_heads(k, H)
    o, S = run(q, k, v, g, scale=default_scale(scale, K), initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), S
