"""Argument checks at the public boundary of the ops.

Every check runs at trace time on shapes and dtypes only and raises a `ValueError` that names the
argument and the shapes involved. Inside an op, code trusts its inputs.

Precision: the ops compute in float32 (states, accumulation; complex64 for the complex scans), so
a 64-bit array (float64, complex128: only possible with `jax_enable_x64`) raises rather than being
quietly computed and returned in 32 bits. Every array a check here looks at is checked
(`check_precision`). Checking against float64 is the tests' business: they compare the float32 ops
with independent float64 NumPy recurrences.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def shape_str(x) -> str:
    return "None" if x is None else str(tuple(jnp.shape(x)))


_WIDE = {jnp.dtype("float64"): "float32", jnp.dtype("complex128"): "complex64"}


def check_precision(name: str, x) -> None:
    """Raises for a 64-bit float or complex array: the ops compute and return 32 bits."""
    if x is None:
        return
    dtype = jnp.result_type(x)
    if dtype in _WIDE:
        raise ValueError(
            f"{name}{shape_str(x)} has dtype {dtype}: linear_jax ops compute in 32 bits (states "
            f"and accumulation float32, outputs in the inputs' dtype), never in 64; cast {name} "
            f"to {_WIDE[dtype]}")


def check_float(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")
    check_precision(name, x)


def check_rank(name: str, x, rank: int, layout: str) -> None:
    """`layout` names the axes, e.g. "[B, T, H, K]", and appears in the error."""
    if x is None:
        raise ValueError(f"{name} is required, expected shape {layout}")
    if jnp.ndim(x) != rank:
        raise ValueError(
            f"{name} must have rank {rank} {layout}, got shape {shape_str(x)} (rank {jnp.ndim(x)})"
        )
    check_precision(name, x)


def check_dims(op: str, named: Sequence[tuple[str, object, int]], what: str) -> int:
    """All `(arg_name, array, axis)` must agree in size along `axis`; returns the size."""
    sizes = {n: jnp.shape(x)[a] for n, x, a in named}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}{shape_str(x)}" for n, x, _ in named)
        raise ValueError(f"{op}: {what} must agree across arguments, got {listing}")
    return next(iter(sizes.values()))


def check_shape(name: str, x, expected: tuple[int, ...], layout: str) -> None:
    check_precision(name, x)
    if tuple(jnp.shape(x)) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)}, got {shape_str(x)}"
        )


def check_segment_ids(segment_ids, B: int, T: int) -> None:
    if segment_ids is None:
        return
    if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise ValueError(
            f"segment_ids must be an integer array [B, T], got dtype {jnp.result_type(segment_ids)}"
        )
    check_shape("segment_ids", segment_ids, (B, T), "[B, T]")


def check_state(name: str, state, expected: tuple[int, ...], layout: str) -> None:
    if state is None:
        return
    check_float(name, state)
    check_shape(name, state, expected, layout)


def check_chunk_size(chunk_size) -> None:
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_log_decay(name: str, g) -> None:
    """Gates are log-space decays, g <= 0.

    Under `jit` the values are unknown and are used as given (a positive g makes the state grow,
    which the chunk form may overflow on); on concrete arrays a positive entry raises here.
    """
    if g is None or isinstance(g, jax.core.Tracer):
        return
    arr = np.asarray(g, dtype=np.float32)
    if arr.size and np.nanmax(arr) > 0:
        raise ValueError(
            f"{name} holds log-space decays and must be <= 0 (alpha = exp({name})), got max "
            f"{float(np.nanmax(arr))} in {name}{shape_str(g)}"
        )


def check_qkv(op: str, q, k, v) -> tuple[int, int, int, int, int]:
    """q, k [B, T, Hk, K] and v [B, T, H, V] with H a multiple of Hk (grouped heads).

    Returns (B, T, H, K, V).
    """
    check_rank("q", q, 4, "[B, T, H, K]")
    check_rank("k", k, 4, "[B, T, H, K]")
    check_rank("v", v, 4, "[B, T, H, V]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
    if jnp.shape(q) != jnp.shape(k):
        raise ValueError(f"{op}: q and k must have the same shape [B, T, H, K], got "
                         f"q{shape_str(q)} and k{shape_str(k)}")
    check_dims(op, [("q", q, 0), ("v", v, 0)], "the batch size B (axis 0)")
    check_dims(op, [("q", q, 1), ("v", v, 1)], "the sequence length T (axis 1)")
    B, T, Hk, K = jnp.shape(q)
    H, V = jnp.shape(v)[2], jnp.shape(v)[3]
    if H % Hk:
        raise ValueError(f"{op}: the heads of v (H={H}) must be a multiple of the heads of q and k "
                         f"(Hk={Hk}), got q{shape_str(q)} and v{shape_str(v)}")
    return B, T, H, K, V


def check_gate(op: str, name: str, g, B: int, T: int, H: int, K: int | None = None) -> None:
    """A per-head gate [B, T, H] (K None) or a per-key gate [B, T, H, K]."""
    if K is None:
        check_rank(name, g, 3, "[B, T, H]")
        expected, layout = (B, T, H), "[B, T, H]"
    else:
        check_rank(name, g, 4, "[B, T, H, K]")
        expected, layout = (B, T, H, K), "[B, T, H, K]"
    check_float(name, g)
    if tuple(jnp.shape(g)) != expected:
        raise ValueError(f"{op}: {name} must have shape {layout} = {expected}, got {shape_str(g)}")
