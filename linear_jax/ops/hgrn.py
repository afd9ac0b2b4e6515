"""HGRN: an element-wise gated linear recurrence with log-space forget gates.

    h_t = exp(g_t) * h_{t-1} + x_t,        output h_t

Shapes: x, g [B, T, D] with g <= 0; state h [B, D] float32; output [B, T, D] in x's dtype.

Qin et al. 2023, "Hierarchically Gated Recurrent Neural Network for Sequence Modeling". The layer
computes the forget gate f = exp(g) (lower-bounded per layer) and feeds x = (1 - f) * i to this op;
the op itself is the bare recurrence, as in FLA's `chunk_hgrn`.

impl: "recurrent" (lax.scan reference), "chunk" (chunked element-wise scan; see
`linear_jax.ops.common.elementwise_chunk`), "pallas" / "pallas:<backend>" (the kernel of the record
below), "auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.elementwise_chunk import chunk_scan
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros


def hgrn_recurrent(x, g, *, initial_state, segment_ids):
    """The reference: one step per token. Inputs already validated."""
    B, _, D = x.shape
    f32 = lambda y: y.astype(jnp.float32)
    h0 = state_or_zeros(initial_state, (B, D))

    def step(h, inp):
        x_t, g_t = inp
        h = jnp.exp(g_t) * h + x_t
        return h, h

    return scan_time(step, h0, (f32(x), f32(g)), segment_ids)


def hgrn_chunk(x, g, *, initial_state, segment_ids, chunk_size):
    f32 = lambda y: None if y is None else y.astype(jnp.float32)
    return chunk_scan(jnp.exp(f32(g)), f32(x), initial_state=f32(initial_state),
                      segment_ids=segment_ids, chunk_size=chunk_size)


registry.register(registry.OpRecord(
    "hgrn", reference=hgrn_recurrent, chunk=hgrn_chunk, elementwise=True,
    kernels=(registry.Kernel("triton", "linear_jax.kernels.gpu.elementwise:hgrn",
                             "linear_jax.kernels.configs:TritonScanConfig"),),
    seq_parallel="linear_jax.parallel.diagonal:hgrn"))


def hgrn(x, g, *, initial_state=None, segment_ids=None, chunk_size=64, impl="auto", config=None):
    """HGRN recurrence. Returns `(h [B,T,D], final_state [B,D] float32)`.

    `g [B, T, D]` holds log forget gates (<= 0): f = exp(g).
    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    _checks.check_rank("x", x, 3, "[B, T, D]")
    _checks.check_float("x", x)
    _checks.check_rank("g", g, 3, "[B, T, D]")
    _checks.check_float("g", g)
    _checks.check_shape("g", g, x.shape, "[B, T, D]")
    _checks.check_log_decay("g", g)
    B, T, D = x.shape
    _checks.check_state("initial_state", initial_state, (B, D), "[B, D]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("hgrn", impl, T, config)
    h, hT = run(x, g, initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size)
    return h.astype(x.dtype), hT
