"""Mamba's selective scan (S6): a diagonal state-space model with input-dependent step sizes.

    dt_t = softplus(delta_t + delta_bias)      (or delta_t + delta_bias without `delta_softplus`)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t          per channel d: h_t[d] in R^N
    y_t  = C_t . h_t + D * u_t,        y_t *= silu(z_t)   when z is given

Shapes: u, delta, z [B, T, D]; A [D, N]; B_, C_ [B, T, N] or grouped [B, T, G, N] (channel d uses
group d // (D / G)); D, delta_bias [D]; state h [B, D, N] float32; y [B, T, D] in u's dtype.
The arguments and their meaning are those of `selective_scan_fn` in Mamba's reference code, laid
out [B, T, ...] (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces"). A is real; A < 0 keeps the state bounded. The exponent dt A is used as a product of
per-step decays exp(dt_s A) <= 1, never as a difference of cumulative sums, so large dt |A| only
underflows to an exact 0.

impl: "recurrent" (lax.scan reference), "chunk" (a `lax.scan` over chunks that builds each chunk's
[C, D, N] decays and inputs inside its body, scans them in parallel and keeps only one [D, N] state
per chunk for the backward pass; see `linear_jax.ops.common.elementwise_chunk`), "pallas" /
"pallas:<backend>" (the kernels of the record below), "auto"; resolved by
`linear_jax.ops.registry`. Every impl takes the op's own arguments (`unfused` below says the
signature); the XLA forms and the TPU kernel form dt, dt * u and the D skip / z gate in XLA
around their scan, the GPU kernels fuse them.

The Hopper kernels (impl="pallas:mosaic_gpu", `linear_jax.kernels.gpu.hopper.selective`; "auto"
takes them on compute capability 9.0 GPUs) apply to bf16 / fp16 u with the channels of each
B / C group (D / G) a multiple of 64; they fuse the softplus step size and its bias, the D skip
and the z gate into a sequential scan, two threads a channel, each holding half of its N states
in registers (one exp per (t, d, n)). Other inputs are declined (`accepts`): "auto" passes over
them to the Triton kernel.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.elementwise_chunk import chunk_scan_fused
from linear_jax.ops.common.recurrent import scan_time
from linear_jax.ops.common.selective import unfused


def _per_channel(M, D: int):
    """[..., G, N] -> [..., D, N]: channel d reads group d // (D / G)."""
    return jnp.repeat(M, D // M.shape[-2], axis=-2)


def selective_scan_recurrent(dt, dtu, A, Bm, Cm, *, initial_state, segment_ids):
    """The reference: one step per token. dt, dtu = dt * u [B,T,D]; Bm, Cm [B,T,G,N]; float32."""
    Bsz, _, D = dt.shape
    h0 = jnp.zeros((Bsz, D, A.shape[1]), jnp.float32) if initial_state is None else initial_state

    def step(h, inp):
        dt_t, dtu_t, B_t, C_t = inp
        h = jnp.exp(dt_t[..., None] * A) * h + dtu_t[..., None] * _per_channel(B_t, D)
        return h, jnp.sum(h * _per_channel(C_t, D), axis=-1)

    return scan_time(step, h0, (dt, dtu, Bm, Cm), segment_ids)


def selective_scan_chunk(dt, dtu, A, Bm, Cm, *, initial_state, segment_ids, chunk_size):
    Bsz, _, D = dt.shape
    h0 = jnp.zeros((Bsz, D, A.shape[1]), jnp.float32) if initial_state is None else initial_state

    def make(xs):
        dt_c, dtu_c, B_c, _ = xs                                     # [B, C, D], [B, C, G, N]
        return jnp.exp(dt_c[..., None] * A), dtu_c[..., None] * _per_channel(B_c, D)

    def read(h, xs):
        return jnp.sum(h * _per_channel(xs[3], D), axis=-1)

    return chunk_scan_fused(make, read, (dt, dtu, Bm, Cm), h0, segment_ids=segment_ids,
                            chunk_size=chunk_size)


def _check_bc(name, M, Bsz, T, D, N):
    if M is None or jnp.ndim(M) not in (3, 4):
        raise ValueError(f"{name} must have shape [B, T, N] or grouped [B, T, G, N], got "
                         f"{_checks.shape_str(M)}")
    _checks.check_float(name, M)
    s = jnp.shape(M)
    G = 1 if M.ndim == 3 else s[2]
    if s[:2] != (Bsz, T) or s[-1] != N or D % G:
        raise ValueError(f"{name} must have shape [B, T, N] = {(Bsz, T, N)} or [B, T, G, N] with G "
                         f"dividing D = {D}, got {name}{_checks.shape_str(M)}")


registry.register(registry.OpRecord(
    "selective_scan", reference=unfused(selective_scan_recurrent),
    chunk=unfused(selective_scan_chunk), elementwise=True,
    # the Hopper kernels (per-thread, 64 channels a CTA) passed their H100 check and ran 3.2x
    # (fwd) and 2.2x (fwd+bwd) faster than the Triton kernel there (benchmarks/NOTES.md, session
    # 20): "auto" takes them on sm_90
    kernels=(registry.Kernel("mosaic_gpu", "linear_jax.kernels.gpu.hopper.selective:selective_scan",
                             "linear_jax.kernels.configs:HopperSelectiveConfig",
                             min_capability=(9, 0), max_capability=(9, 0),
                             accepts="linear_jax.kernels.gpu.hopper.selective:accepts"),
             registry.Kernel("triton", "linear_jax.kernels.gpu.selective:selective_scan",
                             "linear_jax.kernels.configs:TritonSelectiveConfig"),
             registry.Kernel("tpu", "linear_jax.kernels.tpu.selective:selective_scan_op",
                             "linear_jax.kernels.configs:TpuSelectiveConfig"))))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                   initial_state=None, segment_ids=None, chunk_size=64, impl="auto", config=None):
    """Mamba's S6 scan. Returns `(y [B,T,D], final_state [B,D,N] float32)`.

    `config`: a kernel config of `linear_jax.kernels.configs` or a tuple of them (the kernel
    that runs takes the one of its type; None: the device's defaults); the XLA forms ignore it.
    """
    for name, x in (("u", u), ("delta", delta)):
        _checks.check_rank(name, x, 3, "[B, T, D]")
        _checks.check_float(name, x)
    _checks.check_shape("delta", delta, u.shape, "[B, T, D] (the shape of u)")
    Bsz, T, Dm = u.shape
    _checks.check_rank("A", A, 2, "[D, N]")
    _checks.check_float("A", A)
    if A.shape[0] != Dm:
        raise ValueError(f"A must have shape [D, N] with D = {Dm} (u's channels), got "
                         f"A{_checks.shape_str(A)}")
    N = A.shape[1]
    _check_bc("B", B, Bsz, T, Dm, N)
    _check_bc("C", C, Bsz, T, Dm, N)
    for name, x, shape, layout in (("D", D, (Dm,), "[D]"), ("delta_bias", delta_bias, (Dm,), "[D]"),
                                   ("z", z, u.shape, "[B, T, D]")):
        if x is not None:
            _checks.check_float(name, x)
            _checks.check_shape(name, x, shape, layout)
    _checks.check_state("initial_state", initial_state, (Bsz, Dm, N), "[B, D, N]")
    _checks.check_segment_ids(segment_ids, Bsz, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("selective_scan", impl, T, config, args=(u, delta, A, B, C))
    h0 = None if initial_state is None else initial_state.astype(jnp.float32)
    y, hT = run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=h0,
                segment_ids=segment_ids, chunk_size=chunk_size)
    return y.astype(u.dtype), hT
