"""Diagonal linear recurrence with data-given transitions, real or complex.

    h_t = a_t * h_{t-1} + x_t,        output h_t          (element-wise)

Shapes: a, x [B, T, D]; state h [B, D]. Real inputs compute in float32 and return the output in x's
dtype with a float32 state; if a, x or initial_state is complex, everything computes in complex64
and the output and state are complex64.

This is the scan inside the LRU (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for
Long Sequences": complex a = exp(-exp(nu) + i theta), input-independent, so pass it broadcast to
x's shape), S5 (Smith et al. 2023, "Simplified State Space Layers for Sequence Modeling":
a = exp(dt Lambda)) and GateLoop (Katsch 2023, "GateLoop: Fully Data-Controlled Linear
Recurrence": a_t computed from the input).
It is stable for |a| <= 1; a may be negative or complex. Gradients with respect to complex inputs
follow JAX's convention (`jax.grad` of a real loss L returns dL/dRe - i dL/dIm).

impl: "recurrent" (lax.scan reference), "chunk" (chunked element-wise scan; see
`linear_jax.ops.common.elementwise_chunk`), "pallas" / "pallas:<backend>" (the kernel of the record
below), "auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.elementwise_chunk import chunk_scan
from linear_jax.ops.common.recurrent import scan_time


def _is_complex(x) -> bool:
    return x is not None and jnp.issubdtype(jnp.result_type(x), jnp.complexfloating)


def _check_inexact(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        raise ValueError(f"{name} must be a floating-point or complex array, got dtype "
                         f"{jnp.result_type(x)} for {name}{_checks.shape_str(x)}")


def _cast(dtype, *xs):
    return [None if x is None else x.astype(dtype) for x in xs]


def diagonal_scan_recurrent(a, x, *, initial_state, segment_ids):
    """The reference: one step per token. Inputs already validated and in the compute dtype."""
    B, _, D = x.shape
    h0 = jnp.zeros((B, D), x.dtype) if initial_state is None else initial_state

    def step(h, inp):
        a_t, x_t = inp
        h = a_t * h + x_t
        return h, h

    return scan_time(step, h0, (a, x), segment_ids)


def diagonal_scan_chunk(a, x, *, initial_state, segment_ids, chunk_size):
    return chunk_scan(a, x, initial_state=initial_state, segment_ids=segment_ids,
                      chunk_size=chunk_size)


registry.register(registry.OpRecord(
    "diagonal_scan", reference=diagonal_scan_recurrent, chunk=diagonal_scan_chunk,
    elementwise=True,
    kernels=(registry.Kernel("triton", "linear_jax.kernels.gpu.elementwise:diagonal_scan",
                             "linear_jax.kernels.configs:TritonScanConfig"),),
    seq_parallel="linear_jax.parallel.diagonal:diagonal_scan"))


def diagonal_scan(a, x, *, initial_state=None, segment_ids=None, chunk_size=64, impl="auto",
                  config=None):
    """h_t = a_t * h_{t-1} + x_t. Returns `(h [B,T,D], final_state [B,D])`.

    Real inputs: h in x's dtype, state float32. Complex a, x or initial_state: both complex64.
    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    for name, arr in (("a", a), ("x", x)):
        _checks.check_rank(name, arr, 3, "[B, T, D]")
        _check_inexact(name, arr)
    _checks.check_shape("a", a, x.shape, "[B, T, D] (the shape of x)")
    B, T, D = x.shape
    if initial_state is not None:
        _check_inexact("initial_state", initial_state)
        _checks.check_shape("initial_state", initial_state, (B, D), "[B, D]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    choice = registry.resolve("diagonal_scan", impl, T, config)
    complex_ = any(_is_complex(v) for v in (a, x, initial_state))
    dtype = jnp.complex64 if complex_ else jnp.float32
    a_, x_, h0 = _cast(dtype, a, x, initial_state)
    if choice.is_kernel and not complex_:
        a_, x_ = a, x  # the kernel reads bf16/fp16 in place and computes in float32
    h, hT = registry.implementation(choice)(a_, x_, initial_state=h0, segment_ids=segment_ids,
                                            chunk_size=chunk_size)
    return (h if complex_ else h.astype(x.dtype)), hT
