"""The delta rule and Gated DeltaNet as Mosaic TPU kernels, forward and backward.

The math is `linear_jax.ops.common.delta_chunk` (WY/UT form), per chunk of C steps with the scalar
gate's span sums of `simple_gla` (g = 0 for `delta_rule`):

    L   = strictly_lower(beta_i (k_i . k_j) exp(D_ij) same_ij)       T = (I + L)^{-1}
    W   = T (beta * in * exp(Gin) * k),   U = T (beta * v),           u = U - W S_in
    o   = scale [(q k^T) * exp(D) * same] u + scale (in * exp(Gin) * q) S_in
    S_out = keep exp(Gin_last) S_in + (out * exp(R) * k)^T u

The triangular solve is blocked for the MXU: T is built by recursive doubling of the diagonal
blocks, X <- X - X M X with X the inverse over blocks of size b and M the part of L coupling two
neighbouring b-blocks (exact: M X M = 0), b = 1, 2, 4, ... < C, i.e. 2 log2(C) [C, C] products at
float32 precision, no row-by-row scalar work. Backward (reverse chunk sweep, dS carried):

    du = A^T do + kg dS,  dW = -du S_in^T,  dB = T^T [dW | du],  dL = -strict(dB_k W^T + dB_v U^T)

and dL, dA feed dk, dbeta and the gate through the same span-sum routing as `simple_gla`.
Grid, state carry and custom_vjp: `_decay`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import _layout
from linear_jax.kernels.tpu._decay import KernelDef, run
from linear_jax.kernels.tpu.mosaic import F32, dot
from linear_jax.kernels.tpu.simple_gla import chunk_gates, scalar_gate_grad, unpack


def unit_lower_inverse(L, row, col):
    """(I + L)^{-1} for L strictly lower triangular [C, C], by recursive block doubling."""
    C = L.shape[0]
    X = (row == col).astype(F32)
    size = 1
    while size < C:
        sh = size.bit_length() - 1
        pair = lax.shift_right_logical(row, sh + 1) == lax.shift_right_logical(col, sh + 1)
        split = lax.shift_right_logical(row, sh) != lax.shift_right_logical(col, sh)
        M = jnp.where(pair & split, L, 0.0)
        X = X - dot(X, dot(M, X))
        size *= 2
    return X


class _Chunk:
    def __init__(self, refs, docs, C, mode, reverse):
        (q_ref, k_ref, v_ref, g_ref, b_ref), d_ref, self.rest = unpack(refs, docs, 5)
        self.idx, row, col, terms = chunk_gates(g_ref, d_ref, reverse, C)
        self.row, self.col = row, col
        self.decay, self.e_in, self.e_out, self.a = terms
        self.q, self.k, self.v = q_ref[...], k_ref[...], v_ref[...]
        self.kf, self.vf = self.k.astype(F32), self.v.astype(F32)
        self.beta = _layout.table_row(b_ref, self.idx, row, col)[0]
        self.st = "split3" if mode == "fast" else mode    # products that feed the carried state
        self.KK = dot(self.k, self.k, tb=True, mode=mode)
        self.L = jnp.where(row > col, self.beta * self.KK * self.decay, 0.0)
        self.T = unit_lower_inverse(self.L, row, col)
        self.Bk = self.beta * self.e_in * self.kf
        self.W = dot(self.T, self.Bk, mode=self.st)
        self.U = dot(self.T, self.beta * self.vf, mode=self.st)


def _fwd_kernel(*refs, C, scale, docs, save, mode, cfg):
    ch = _Chunk(refs, docs, C, mode, reverse=False)
    s0_ref, o_ref, sT_ref = ch.rest[:3]
    sc_ref = ch.rest[3] if save else None
    S_ref = ch.rest[-1]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        S_ref[...] = s0_ref[...]

    S_in = S_ref[...]
    if save:
        sc_ref[...] = S_in
    u = ch.U - dot(ch.W, S_in, mode=ch.st)
    A = dot(ch.q, ch.k, tb=True, mode=mode) * (scale * ch.decay)
    o = dot(A, u, mode=mode) + dot((scale * ch.e_in) * ch.q.astype(F32), S_in, mode=mode)
    o_ref[...] = o.astype(o_ref.dtype)
    S_ref[...] = ch.a * S_in + dot(ch.e_out * ch.kf, u, ta=True, mode=ch.st)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sT_ref[...] = S_ref[...]


def _bwd_kernel(*refs, C, scale, docs, mode, cfg):
    ch = _Chunk(refs, docs, C, mode, reverse=True)
    sc_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref, dg_ref, db_ref, ds0_ref, dS_ref = ch.rest
    m = pl.program_id(2)

    @pl.when(m == 0)
    def _():
        dS_ref[...] = dsT_ref[...]

    row, col, st = ch.row, ch.col, ch.st
    do, S_in, dS = do_ref[...], sc_ref[...], dS_ref[...]
    qf = ch.q.astype(F32)
    u = ch.U - dot(ch.W, S_in, mode=st)
    A = dot(ch.q, ch.k, tb=True, mode=mode) * (scale * ch.decay)
    qg, kg = (scale * ch.e_in) * qf, ch.e_out * ch.kf

    du = dot(A, do, ta=True, mode=mode) + dot(kg, dS, mode=st)
    dA = dot(do, u, tb=True, mode=mode)
    dQK = dA * (scale * ch.decay)
    dq_in = dot(do, S_in, tb=True, mode=mode)                   # dL/d(qg)
    dk_out = dot(u, dS, tb=True, mode=mode)                     # dL/d(kg)
    dW = -dot(du, S_in, tb=True, mode=st)
    dBk = dot(ch.T, dW, ta=True, mode=st)
    dBv = dot(ch.T, du, ta=True, mode=st)
    dL = -(dot(dBk, ch.W, tb=True, mode=st) + dot(dBv, ch.U, tb=True, mode=st))
    dL = jnp.where(row > col, dL, 0.0)
    dKK = dL * ch.beta * ch.decay                               # through L = beta KK exp(D)

    dq_ref[...] = (dot(dQK, ch.k, mode=mode) + (scale * ch.e_in) * dq_in).astype(dq_ref.dtype)
    dk = (dot(dQK, ch.q, ta=True, mode=mode) + dot(dKK, ch.kf, mode=st)
          + dot(dKK, ch.kf, ta=True, mode=st) + ch.e_out * dk_out + (ch.beta * ch.e_in) * dBk)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = (ch.beta * dBv).astype(dv_ref.dtype)
    dbeta = (jnp.sum(dL * ch.KK * ch.decay, axis=1, keepdims=True)
             + jnp.sum(dBv * ch.vf, axis=1, keepdims=True)
             + jnp.sum(dBk * ch.e_in * ch.kf, axis=1, keepdims=True))
    _layout.store_row(db_ref, ch.idx, dbeta, row, col)

    d_gin = jnp.sum(qg * dq_in, axis=1, keepdims=True) + jnp.sum(dBk * ch.Bk, axis=1, keepdims=True)
    d_r = jnp.sum(kg * dk_out, axis=1, keepdims=True)
    d_tot = ch.a * jnp.sum(jnp.sum(S_in * dS, axis=1, keepdims=True), axis=0, keepdims=True)
    dg = scalar_gate_grad(dA * A + dL * ch.L, d_gin, d_r, d_tot, row, col)
    _layout.store_row(dg_ref, ch.idx, dg, row, col)

    dS_ref[...] = ch.a * dS + dot(qg, do, ta=True, mode=st) - dot(ch.W, du, ta=True, mode=st)

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dS_ref[...]


_KERNEL = KernelDef("delta_rule", vector_gate=False, fwd=_fwd_kernel, bwd=_bwd_kernel, beta=True)


def delta_rule(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size,
               config: TpuConfig | None = None):
    """Same contract as `linear_jax.ops.delta_rule.delta_rule_chunk`, called `fn(q, k, v, g, beta,
    ...)` with heads expanded and g None for `delta_rule` (a [B, T, H] log decay for
    `gated_delta_rule`): returns o [B, T, H, V] in v's dtype and S [B, H, K, V] float32."""
    return run(_KERNEL, q, k, v, g, beta=beta, scale=scale, initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size, config=config)
