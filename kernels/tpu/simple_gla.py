"""Simple GLA (scalar log-decay per head and step) as Mosaic TPU kernels, forward and backward.

The math is `linear_jax.ops.common.decay_chunk` for a scalar gate, per chunk of C steps with the
chunk-local gate spans of `linear_jax.kernels.tiles` (all sums of exactly the gates inside the
span, each <= 0):

    o     = scale [(q k^T) * exp(D) * same] v + scale (in * exp(Gin) * q) S_in
    S_out = keep exp(Gtot) S_in + (out * exp(R) * k)^T v

Grid, state carry and custom_vjp: `_decay`. The forward body forms the [C, C] intra matrix on the
MXU (q k^T, then A v) and the inter-chunk terms as [C, K] x [K, V] products with the carried state.
Span sums and the gate gradient are `tiles.scalar_gate_terms` / `tiles.scalar_gate_grad` with the
0/1 products exact on the MXU (`mosaic.dot(mode="mask")`): every pair's and row's gradient reaches
exactly the gates of its span, nothing is subtracted.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.kernels import tiles
from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu._decay import KernelDef, run
from linear_jax.kernels.tpu.mosaic import F32, dot


def mask_dot(m, x):
    return dot(m, x, mode="mask")


def gate_terms(ch):
    """`tiles.scalar_gate_terms` of this chunk's gates: (decay, e_in, e_out, a)."""
    gc, gr = ch.table(ch.g)
    return tiles.scalar_gate_terms(gc, gr, ch.masks, ch.row, ch.col, mask_dot)


def gate_grad(ch, P, d_gin, d_r, d_tot):
    """`tiles.scalar_gate_grad` of this chunk, as a column [C, 1]."""
    return tiles.scalar_gate_grad(P, d_gin, d_r, d_tot, ch.row, ch.col, mask_dot)


def state_step(mode):
    """The matmul mode of products that feed the carried state: bf16 inputs split the float32
    factor into two bf16 parts, so the state keeps ~16 bits."""
    return "split" if mode == "fast" else mode


def _fwd(ch, o_ref, S_in, extra, *, C, scale, mode, cfg):
    decay, e_in, e_out, a = gate_terms(ch)
    q, k, v = ch.q[...], ch.k[...], ch.v[...]
    A = dot(q, k, tb=True, mode=mode) * (scale * decay)
    o = dot(A, v, mode=mode) + dot((scale * e_in) * q.astype(F32), S_in, mode=mode)
    o_ref[...] = o.astype(o_ref.dtype)
    return a * S_in + dot(e_out * k.astype(F32), v, ta=True, mode=state_step(mode))


def _bwd(ch, S_in, do, dS, outs, extra, *, C, scale, mode, cfg):
    dq_ref, dk_ref, dv_ref, dg_ref = outs
    decay, e_in, e_out, a = gate_terms(ch)
    q, k, v = ch.q[...], ch.k[...], ch.v[...]
    A = dot(q, k, tb=True, mode=mode) * (scale * decay)
    dA = dot(do, v, tb=True, mode=mode)
    dQK = dA * (scale * decay)
    qg = (scale * e_in) * q.astype(F32)
    kg = e_out * k.astype(F32)
    dq_in = dot(do, S_in, tb=True, mode=mode)            # dL/d(qg)  [C, K]
    dk_out = dot(v, dS, tb=True, mode=mode)              # dL/d(kg)  [C, K]
    dq_ref[...] = (dot(dQK, k, mode=mode) + (scale * e_in) * dq_in).astype(dq_ref.dtype)
    dk_ref[...] = (dot(dQK, q, ta=True, mode=mode) + e_out * dk_out).astype(dk_ref.dtype)
    dv_ref[...] = (dot(A, do, ta=True, mode=mode) + dot(kg, dS, mode=mode)).astype(dv_ref.dtype)

    rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)
    d_tot = a * jnp.sum(rowsum(S_in * dS), axis=0, keepdims=True)
    ch.store(dg_ref, gate_grad(ch, dA * A, rowsum(qg * dq_in), rowsum(kg * dk_out), d_tot))
    return a * dS + dot(qg, do, ta=True, mode=state_step(mode))


_KERNEL = KernelDef("simple_gla", vector_gate=False, fwd=_fwd, bwd=_bwd)


def simple_gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size,
               config: TpuConfig | None = None):
    """Same contract as `linear_jax.ops.simple_gla.simple_gla_chunk` (heads expanded, inputs
    validated; g may be None), plus the kernel config (the registry always passes one; None takes
    `TpuConfig.default()`): returns o [B, T, H, V] in v's dtype and S [B, H, K, V] float32."""
    return run(_KERNEL, q, k, v, g, scale=scale, initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size, config=config)
