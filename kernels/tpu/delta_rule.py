"""The delta rule and Gated DeltaNet as Mosaic TPU kernels, forward and backward.

The math is `linear_jax.ops.common.delta_chunk` (WY/UT form), per chunk of C steps with the scalar
gate's span sums of `simple_gla` (g = 0 for `delta_rule`):

    L   = strictly_lower(beta_i (k_i . k_j) exp(D_ij) same_ij)       T = (I + L)^{-1}
    W   = T (beta * in * exp(Gin) * k),   U = T (beta * v),           u = U - W S_in
    o   = scale [(q k^T) * exp(D) * same] u + scale (in * exp(Gin) * q) S_in
    S_out = keep exp(Gin_last) S_in + (out * exp(R) * k)^T u

The triangular solve is `tiles.unit_lower_inverse` (recursive doubling: 2 log2(C) [C, C] products
at float32 precision on the MXU, no row-by-row scalar work; the same algorithm as the GPU kernels
and the XLA form). Backward (reverse chunk sweep, dS carried):

    du = A^T do + kg dS,  dW = -du S_in^T,  dB = T^T [dW | du],  dL = -strict(dB_k W^T + dB_v U^T)

and dL, dA feed dk, dbeta and the gate through the same span-sum routing as `simple_gla`
(`tiles.scalar_gate_grad` of the pairs dA * A + dL * L).
Grid, state carry and custom_vjp: `_decay`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.kernels import tiles
from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu._decay import KernelDef, run
from linear_jax.kernels.tpu.mosaic import F32, dot
from linear_jax.kernels.tpu.simple_gla import gate_grad, gate_terms

rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)


class _Terms:
    """The chunk's gate factors, T = (I + L)^-1, W and U (module docstring)."""

    def __init__(self, ch, mode):
        row, col = ch.row, ch.col
        self.decay, self.e_in, self.e_out, self.a = gate_terms(ch)
        self.q, self.k, self.v = ch.q[...], ch.k[...], ch.v[...]
        self.kf, self.vf = self.k.astype(F32), self.v.astype(F32)
        self.beta = ch.table(ch.scalars[0])[0]
        self.st = "split3" if mode == "fast" else mode    # products that feed the carried state
        self.KK = dot(self.k, self.k, tb=True, mode=mode)
        self.L = jnp.where(row > col, self.beta * self.KK * self.decay, 0.0)
        self.T = tiles.unit_lower_inverse(self.L, row, col, dot)
        self.Bk = self.beta * self.e_in * self.kf
        self.W = dot(self.T, self.Bk, mode=self.st)
        self.U = dot(self.T, self.beta * self.vf, mode=self.st)


def _fwd(ch, o_ref, S_in, extra, *, C, scale, mode, cfg):
    t = _Terms(ch, mode)
    u = t.U - dot(t.W, S_in, mode=t.st)
    A = dot(t.q, t.k, tb=True, mode=mode) * (scale * t.decay)
    o = dot(A, u, mode=mode) + dot((scale * t.e_in) * t.q.astype(F32), S_in, mode=mode)
    o_ref[...] = o.astype(o_ref.dtype)
    return t.a * S_in + dot(t.e_out * t.kf, u, ta=True, mode=t.st)


def _bwd(ch, S_in, do, dS, outs, extra, *, C, scale, mode, cfg):
    dq_ref, dk_ref, dv_ref, dg_ref, db_ref = outs
    t = _Terms(ch, mode)
    st = t.st
    qf = t.q.astype(F32)
    u = t.U - dot(t.W, S_in, mode=st)
    A = dot(t.q, t.k, tb=True, mode=mode) * (scale * t.decay)
    qg, kg = (scale * t.e_in) * qf, t.e_out * t.kf

    du = dot(A, do, ta=True, mode=mode) + dot(kg, dS, mode=st)
    dA = dot(do, u, tb=True, mode=mode)
    dQK = dA * (scale * t.decay)
    dq_in = dot(do, S_in, tb=True, mode=mode)                   # dL/d(qg)
    dk_out = dot(u, dS, tb=True, mode=mode)                     # dL/d(kg)
    dW = -dot(du, S_in, tb=True, mode=st)
    dBk = dot(t.T, dW, ta=True, mode=st)
    dBv = dot(t.T, du, ta=True, mode=st)
    dL = -(dot(dBk, t.W, tb=True, mode=st) + dot(dBv, t.U, tb=True, mode=st))
    dL = jnp.where(ch.row > ch.col, dL, 0.0)
    dKK = dL * t.beta * t.decay                                 # through L = beta KK exp(D)

    dq_ref[...] = (dot(dQK, t.k, mode=mode) + (scale * t.e_in) * dq_in).astype(dq_ref.dtype)
    dk = (dot(dQK, t.q, ta=True, mode=mode) + dot(dKK, t.kf, mode=st)
          + dot(dKK, t.kf, ta=True, mode=st) + t.e_out * dk_out + (t.beta * t.e_in) * dBk)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = (t.beta * dBv).astype(dv_ref.dtype)
    ch.store(db_ref, rowsum(dL * t.KK * t.decay) + rowsum(dBv * t.vf)
             + rowsum(dBk * t.e_in * t.kf))

    d_gin = rowsum(qg * dq_in) + rowsum(dBk * t.Bk)
    d_tot = t.a * jnp.sum(rowsum(S_in * dS), axis=0, keepdims=True)
    ch.store(dg_ref, gate_grad(ch, dA * A + dL * t.L, d_gin, rowsum(kg * dk_out), d_tot))
    return t.a * dS + dot(qg, do, ta=True, mode=st) - dot(t.W, du, ta=True, mode=st)


_KERNEL = KernelDef("delta_rule", vector_gate=False, fwd=_fwd, bwd=_bwd, scalars=1)


def delta_rule(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size,
               config: TpuConfig | None = None):
    """Same contract as `linear_jax.ops.delta_rule.delta_rule_chunk`, called `fn(q, k, v, g, beta,
    ...)` with heads expanded and g None for `delta_rule` (a [B, T, H] log decay for
    `gated_delta_rule`), plus the kernel config (the registry always passes one; None takes
    `TpuConfig.default()`): returns o [B, T, H, V] in v's dtype and S [B, H, K, V] float32."""
    return run(_KERNEL, q, k, v, g, scalars=(beta,), scale=scale, initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size, config=config)
