"""Mamba-2's state-space duality (SSD) layer recurrence (Dao & Gu 2024, "Transformers are SSMs").

With dt_t = softplus(dt_t + dt_bias) (or dt as given when `dt_softplus=False`), a scalar A <= 0 per
head, and B_t, C_t shared by the H // G heads of each of G groups:

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,        y_t = h_t^T C_t + D x_t

Shapes: x [B, T, H, P]; dt [B, T, H]; A, D, dt_bias [H]; B, C [B, T, G, N] (H a multiple of G);
state h [B, H, N, P] float32; y [B, T, H, P] in x's dtype. Layers hold A = -exp(A_log).

This is `simple_gla` with q = C, k = B, v = x * dt, g = dt * A and scale 1 (grouped B and C are
that op's grouped q and k), so SSD runs on simple GLA's recurrent, chunk and kernel paths (its
record names `kernels_of="simple_gla"`); the skip D x is added here. The gates and the skip run in
float32; v = x * dt is formed in float32 and handed to the kernels in x's dtype (float32 for
float16 x, as linear attention's normaliser column): in float32 it made every kernel input
float32, which the Triton kernels multiply in IEEE float32 on the CUDA cores and the Mosaic GPU
kernels refuse, so "auto" ran Mamba-2's MQAR step at d256 in 388 ms on an H100 where the chunk
form took 172 (session 33).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.dtypes import kernel_values_dtype
from linear_jax.ops.common.gates import step_size
from linear_jax.ops.simple_gla import simple_gla


def _check_sign(name: str, x, rule: str) -> None:
    """A concrete `x` must obey `rule`, "<= 0" or ">= 0"; under `jit` values are used as given."""
    if isinstance(x, jax.core.Tracer) or not np.size(x):
        return
    arr = np.asarray(x, dtype=np.float32)
    worst = np.nanmax(arr) if rule == "<= 0" else np.nanmin(arr)
    if (worst > 0) if rule == "<= 0" else (worst < 0):
        raise ValueError(f"ssd: {name} must be {rule}, got {float(worst)} in {name}"
                         f"{_checks.shape_str(x)}")


def _check_args(x, dt, A, B, C, D, dt_bias, dt_softplus):
    _checks.check_rank("x", x, 4, "[B, T, H, P]")
    _checks.check_rank("B", B, 4, "[B, T, G, N]")
    _checks.check_rank("C", C, 4, "[B, T, G, N]")
    for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        _checks.check_float(name, a)
    Bsz, T, H, P = jnp.shape(x)
    _checks.check_gate("ssd", "dt", dt, Bsz, T, H)
    if jnp.shape(B) != jnp.shape(C):
        raise ValueError(f"ssd: B and C must have the same shape [B, T, G, N], got "
                         f"B{_checks.shape_str(B)} and C{_checks.shape_str(C)}")
    _checks.check_dims("ssd", [("x", x, 0), ("B", B, 0)], "the batch size B (axis 0)")
    _checks.check_dims("ssd", [("x", x, 1), ("B", B, 1)], "the sequence length T (axis 1)")
    G, N = jnp.shape(B)[2:]
    if H % G:
        raise ValueError(f"ssd: the heads of x (H={H}) must be a multiple of the groups of B and C "
                         f"(G={G}), got x{_checks.shape_str(x)} and B{_checks.shape_str(B)}")
    _checks.check_shape("A", A, (H,), "[H]")
    for name, a in (("D", D), ("dt_bias", dt_bias)):
        if a is not None:
            _checks.check_float(name, a)
            _checks.check_shape(name, a, (H,), "[H]")
    _check_sign("A", A, "<= 0")
    if not dt_softplus:
        _check_sign("dt", dt, ">= 0")
    return Bsz, T, H, P, N


registry.register(registry.OpRecord("ssd", kernels_of="simple_gla",
                                    seq_parallel="linear_jax.parallel.ssd:ssd"))


def ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, *, initial_state=None,
        segment_ids=None, chunk_size=64, impl="auto", config=None):
    """Mamba-2 SSD. Returns `(y [B,T,H,P], final_state [B,H,N,P] float32)`.

    `A` must be <= 0 and, with `dt_softplus=False`, `dt` >= 0 (checked on concrete arrays).
    `impl` (and with it `config`) is resolved here and the choice handed to `simple_gla`.
    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    Bsz, T, H, P, N = _check_args(x, dt, A, B, C, D, dt_bias, dt_softplus)
    _checks.check_state("initial_state", initial_state, (Bsz, H, N, P), "[B, H, N, P]")
    _checks.check_segment_ids(segment_ids, Bsz, T)
    _checks.check_chunk_size(chunk_size)
    f32 = lambda a: a.astype(jnp.float32)
    dt = step_size(dt, dt_bias, dt_softplus)
    v = scaled_values(x, dt)
    choice = registry.resolve("ssd", impl, T, config, args=(C, B, v))
    o, h = simple_gla(C, B, v, dt * f32(A), scale=1.0, initial_state=initial_state,
                      segment_ids=segment_ids, chunk_size=chunk_size, impl=choice.impl,
                      config=choice.config)
    if D is not None:
        o = o + f32(D)[:, None] * f32(x)
    return o.astype(x.dtype), h


def scaled_values(x, dt):
    """v = x * dt, formed in float32, in x's dtype (float32 for float16 x): the kernels' values."""
    return (x.astype(jnp.float32) * dt[..., None]).astype(kernel_values_dtype(x.dtype))
