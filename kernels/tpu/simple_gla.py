"""Simple GLA (scalar log-decay per head and step) as Mosaic TPU kernels, forward and backward.

The math is `linear_jax.ops.common.decay_chunk` for a scalar gate, per chunk of C steps with the
chunk-local gate spans (all sums of exactly the gates inside the span, each <= 0):

    Gin_i = sum_{s<=i} g_s,   R_j = sum_{s>j} g_s,   D_ij = sum_{j<s<=i} g_s
    o     = scale [(q k^T) * exp(D) * same] v + scale (in * exp(Gin) * q) S_in
    S_out = keep exp(Gin_last) S_in + (out * exp(R) * k)^T v

Grid, state carry and custom_vjp: `_decay`. The forward body forms the [C, C] intra matrix on the
MXU (q k^T, then A v) and the inter-chunk terms as [C, K] x [K, V] products with the carried state.

Span sums in the kernel: D = L @ (g masked to s > j) with L the 0/1 lower triangle (an exact MXU
product, `dot(mode="mask")`), Gin and R as masked lane sums of the chunk's gate row. The gradient of
the gates never subtracts cumulative sums either: with P = dL/dD,
    dg_s = sum_{i>=s, j<s} P_ij + sum_{i>=s} dGin_i + sum_{j<s} dR_j + dGin_last,
the first term a 0/1 product U @ P then a masked lane sum, the next two 0/1 products.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import _layout
from linear_jax.kernels.tpu._decay import KernelDef, run
from linear_jax.kernels.tpu._layout import iotas
from linear_jax.kernels.tpu.mosaic import F32, dot


def scalar_gate_terms(gc, gr, masks, row, col):
    """Decay factors of one chunk from the gates as a column gc [C, 1] and a row gr [1, C]."""
    same, in_rows, out_rows, keep = masks
    Gin = jnp.sum(jnp.where(col <= row, gr, 0.0), axis=1, keepdims=True)
    R = jnp.sum(jnp.where(col > row, gr, 0.0), axis=1, keepdims=True)
    Gtot = jnp.sum(gr, axis=1, keepdims=True)
    D = dot((row >= col).astype(F32), jnp.where(row > col, gc, 0.0), mode="mask")  # sum_{j<s<=i}
    decay = jnp.where(same, jnp.exp(D), 0.0)
    e_in, e_out, a = jnp.exp(Gin), jnp.exp(R), jnp.exp(Gtot)
    if in_rows is not None:
        e_in = jnp.where(in_rows, e_in, 0.0)
        e_out = jnp.where(out_rows, e_out, 0.0)
        a = jnp.where(keep, a, 0.0)
    return decay, e_in, e_out, a


def scalar_gate_grad(P, d_gin, d_r, d_tot, row, col):
    """dL/dg [C, 1] from P = dL/dD [C, C], dL/dGin and dL/dR [C, 1] and dL/dGin_last [1, 1]:
    every term a sum over the pairs / rows whose span contains s, nothing subtracted."""
    upper = (row <= col).astype(F32)                               # U[s, i] = [i >= s]
    from_D = jnp.sum(jnp.where(col < row, dot(upper, P, mode="mask"), 0.0), axis=1,
                     keepdims=True)
    Z = jnp.where(col == 0, d_gin, 0.0) + jnp.where(col == 1, d_r, 0.0)
    rc = dot(upper, Z, mode="mask")   # lane 0: sum_{i>=s} dGin_i
    cs = dot((row > col).astype(F32), Z, mode="mask")   # lane 1: sum_{j<s} dR_j
    tail = jnp.sum(jnp.where(col == 0, rc, 0.0) + jnp.where(col == 1, cs, 0.0), axis=1,
                   keepdims=True)
    return from_D + tail + d_tot


def unpack(refs, docs, n_in=4):
    """(first n_in refs, document table ref or None, the rest) in `_decay`'s ref order."""
    it = iter(refs)
    ins = [next(it) for _ in range(n_in)]
    return ins, next(it) if docs else None, list(it)


def chunk_gates(g_ref, d_ref, reverse, C):
    """(chunk index, iotas, masks, scalar_gate_terms) of this grid step."""
    idx = _layout.chunk_index(reverse)
    row, col = iotas(C)
    masks = _layout.doc_masks_at(d_ref, idx, row, col)
    gc, gr = _layout.table_row(g_ref, idx, row, col)
    return idx, row, col, scalar_gate_terms(gc, gr, masks, row, col)


def _fwd_kernel(*refs, C, scale, docs, save, mode, cfg):
    (q_ref, k_ref, v_ref, g_ref), d_ref, rest = unpack(refs, docs)
    s0_ref, o_ref, sT_ref = rest[:3]
    sc_ref = rest[3] if save else None
    S_ref = rest[-1]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        S_ref[...] = s0_ref[...]

    _, row, col, (decay, e_in, e_out, a) = chunk_gates(g_ref, d_ref, False, C)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    S_in = S_ref[...]
    if save:
        sc_ref[...] = S_in
    A = dot(q, k, tb=True, mode=mode) * (scale * decay)
    o = dot(A, v, mode=mode) + dot((scale * e_in) * q.astype(F32), S_in, mode=mode)
    o_ref[...] = o.astype(o_ref.dtype)
    S_ref[...] = a * S_in + dot(e_out * k.astype(F32), v, ta=True,
                                mode="split" if mode == "fast" else mode)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sT_ref[...] = S_ref[...]


def _bwd_kernel(*refs, C, scale, docs, mode, cfg):
    (q_ref, k_ref, v_ref, g_ref), d_ref, rest = unpack(refs, docs)
    sc_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref, dS_ref = rest
    m = pl.program_id(2)

    @pl.when(m == 0)
    def _():
        dS_ref[...] = dsT_ref[...]

    idx, row, col, (decay, e_in, e_out, a) = chunk_gates(g_ref, d_ref, True, C)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    S_in, dS = sc_ref[...], dS_ref[...]
    split = "split" if mode == "fast" else mode

    QK = dot(q, k, tb=True, mode=mode)
    A = QK * (scale * decay)
    dA = dot(do, v, tb=True, mode=mode)
    dQK = dA * (scale * decay)
    qg = (scale * e_in) * q.astype(F32)
    kg = e_out * k.astype(F32)
    dq_in = dot(do, S_in, tb=True, mode=mode)            # dL/d(qg)  [C, K]
    dk_out = dot(v, dS, tb=True, mode=mode)              # dL/d(kg)  [C, K]
    dq_ref[...] = (dot(dQK, k, mode=mode) + (scale * e_in) * dq_in).astype(dq_ref.dtype)
    dk_ref[...] = (dot(dQK, q, ta=True, mode=mode) + e_out * dk_out).astype(dk_ref.dtype)
    dv_ref[...] = (dot(A, do, ta=True, mode=mode) + dot(kg, dS, mode=mode)).astype(dv_ref.dtype)

    d_gin = jnp.sum(qg * dq_in, axis=1, keepdims=True)             # dL/dGin_i  [C, 1]
    d_r = jnp.sum(kg * dk_out, axis=1, keepdims=True)              # dL/dR_j    [C, 1]
    d_tot = a * jnp.sum(jnp.sum(S_in * dS, axis=1, keepdims=True), axis=0, keepdims=True)
    _layout.store_row(dg_ref, idx, scalar_gate_grad(dA * A, d_gin, d_r, d_tot, row, col), row,
                      col)

    dS_ref[...] = a * dS + dot(qg, do, ta=True, mode=split)

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dS_ref[...]


_KERNEL = KernelDef("simple_gla", vector_gate=False, fwd=_fwd_kernel, bwd=_bwd_kernel)


def simple_gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size,
               config: TpuConfig | None = None):
    """Same contract as `linear_jax.ops.simple_gla.simple_gla_chunk` (heads expanded, inputs
    validated; g may be None): returns o [B, T, H, V] in v's dtype and S [B, H, K, V] float32."""
    return run(_KERNEL, q, k, v, g, scale=scale, initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size, config=config)
