"""GLA (log-decay per head, step and key channel) as Mosaic TPU kernels, forward and backward.

The math is `linear_jax.ops.common.decay_chunk` for a vector gate g [C, K] per chunk. The chunk's
span sums come from one exact 0/1 product M @ g (M stacks four [C, C] masks):

    Gin_i = sum_{s<=i} g_s    R_j = sum_{s>j} g_s    (chunk)
    Gloc_i, Rloc_j: the same inside the sub-chunk of length c holding i or j;  tot_m: sub-chunk sums

The intra term A_ij = sum_k q_ik k_jk exp(span(j, i]_k) cannot be factored through one reference
point without ratios exp(-G) that overflow, so it is built in two parts (cf. `decay_chunk`):
- key sub-chunk b < query sub-chunk a: factored through the end e_b of sub-chunk b,
  exp(span(j, e_b]) = exp(Rloc_j) on the keys and exp(span(e_b, i]) = exp(Gloc_i + tot_{b+1..a-1})
  on the queries, both <= 1: one [C, K] x [K, C] MXU product per b, masked to the block column b;
- the diagonal sub-chunks elementwise: for each key j, E_j[i] = span(j, i] over the rows of its
  sub-chunk, built as E_j = E_{j+1} + [i > j] g_{j+1} (adding gates, never subtracting), then a lane
  sum of q * exp(E_j) * k_j. This part runs on the VPU and bounds the kernel (docs/tpu_kernels.md).
The backward of E_j's recurrence runs j upwards, so the backward first stores E_j for the sub-chunk
in a [c, c, K] VMEM scratch. Gate gradients are routed through the transposes of the same 0/1
masks, so every pair's gradient reaches exactly the gates of its span (nothing cancels at strong
decay). Grid, state carry and custom_vjp: `_decay`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import _layout, mosaic
from linear_jax.kernels.tpu._decay import KernelDef, run
from linear_jax.kernels.tpu._layout import iotas
from linear_jax.kernels.tpu.mosaic import F32, dot
from linear_jax.kernels.tpu.simple_gla import unpack


def _sub(C, cfg):
    return math.gcd(C, cfg.sub_chunk)


def _row(x, r, j):
    """Row j of x [c, K] as [1, K] (a masked sublane sum: exact, and no unaligned slicing)."""
    return jnp.sum(jnp.where(r == j, x, 0.0), axis=0, keepdims=True)


class _Chunk:
    """Span sums and decay factors of one chunk, shared by the forward and backward bodies."""

    def __init__(self, g, masks, C, c, scale, q, k):
        self.C, self.c, self.s = C, c, C // c
        self.row, self.col = iotas(C)
        sh = c.bit_length() - 1                                            # c is a power of 2
        rs, cs = lax.shift_right_logical(self.row, sh), lax.shift_right_logical(self.col, sh)
        self.rs, self.cs = rs, cs
        same_sub = rs == cs
        lower, upper = self.row >= self.col, self.col > self.row
        self.M = jnp.concatenate([m.astype(F32) for m in
                                  (lower, upper, lower & same_sub, upper & same_sub)], axis=0)
        spans = dot(self.M, g, mode="mask")                                             # [4C, K]
        self.Gin, self.R = spans[:C], spans[C:2 * C]
        self.Gloc, self.Rloc = spans[2 * C:3 * C], spans[3 * C:]
        self.tot = [jnp.sum(g[m * c:(m + 1) * c], axis=0, keepdims=True) for m in range(self.s)]
        same, in_rows, out_rows, keep = masks
        self.same = same
        self.e_in, self.e_out = jnp.exp(self.Gin), jnp.exp(self.R)
        self.a_row = jnp.exp(jnp.sum(g, axis=0, keepdims=True))            # [1, K]
        if in_rows is not None:
            self.e_in = jnp.where(in_rows, self.e_in, 0.0)
            self.e_out = jnp.where(out_rows, self.e_out, 0.0)
            self.a_row = jnp.where(keep, self.a_row, 0.0)
        K = g.shape[1]
        e0 = (lax.broadcasted_iota(jnp.int32, (8, 128), 0) == 0).astype(F32)
        self.a_col = jnp.max(dot(jnp.broadcast_to(self.a_row, (8, K)), e0, ta=True), axis=1,
                             keepdims=True)                                # [K, 1]
        self.g = g
        self.qs = scale * q.astype(F32)
        self.kf = k.astype(F32)
        self.kt = self.kf * jnp.exp(self.Rloc)

    def e_off(self, b):
        """span(e_b, i] for rows i in sub-chunks after b (0 above)."""
        c, K = self.c, self.g.shape[1]
        pieces, off = [jnp.zeros(((b + 1) * c, K), F32)], jnp.zeros((1, K), F32)
        for a in range(b + 1, self.s):
            pieces.append(self.Gloc[a * c:(a + 1) * c] + off)
            off = off + self.tot[a]
        return jnp.concatenate(pieces, axis=0)

    def block(self, b):
        return (self.cs == b) & (self.rs > b)

    def diag_E(self, a, j, E, r):
        """E_j from E_{j+1} inside sub-chunk a."""
        if j == self.c - 1:
            return jnp.zeros_like(E)
        ga = self.g[a * self.c:(a + 1) * self.c]
        return E + jnp.where(r > j, _row(ga, r, j + 1), 0.0)

    def intra(self, mode):
        C, c = self.C, self.c
        A = jnp.zeros((C, C), F32)
        for b in range(self.s - 1):
            Qb = self.qs * jnp.exp(self.e_off(b))
            A = A + jnp.where(self.block(b), dot(Qb, self.kt, tb=True, mode=mode), 0.0)
        K = self.g.shape[1]
        r = lax.broadcasted_iota(jnp.int32, (c, K), 0)
        lanes = lax.broadcasted_iota(jnp.int32, (c, C), 1)
        rows = lax.broadcasted_iota(jnp.int32, (c, C), 0)
        diag = []
        for a in range(self.s):
            qa, ka = self.qs[a * c:(a + 1) * c], self.kf[a * c:(a + 1) * c]
            E, Ad = jnp.zeros((c, K), F32), jnp.zeros((c, C), F32)
            for j in reversed(range(c)):
                E = self.diag_E(a, j, E, r)
                colv = jnp.sum(qa * jnp.exp(E) * _row(ka, r, j), axis=1, keepdims=True)
                Ad = Ad + jnp.where((lanes == a * c + j) & (rows >= j), colv, 0.0)
            diag.append(Ad)
        return jnp.where(self.same, A + jnp.concatenate(diag, axis=0), 0.0)


def _setup(refs, docs, C, c, scale, reverse):
    (q_ref, k_ref, v_ref, g_ref), d_ref, rest = unpack(refs, docs)
    row, col = iotas(C)
    masks = _layout.doc_masks_at(d_ref, _layout.chunk_index(reverse), row, col)
    return _Chunk(g_ref[...], masks, C, c, scale, q_ref[...], k_ref[...]), v_ref, rest


def _fwd_kernel(*refs, C, scale, docs, save, mode, cfg):
    ch, v_ref, rest = _setup(refs, docs, C, _sub(C, cfg), scale, reverse=False)
    s0_ref, o_ref, sT_ref = rest[:3]
    sc_ref = rest[3] if save else None
    S_ref = rest[-1]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        S_ref[...] = s0_ref[...]

    v = v_ref[...]
    S_in = S_ref[...]
    if save:
        sc_ref[...] = S_in
    o = dot(ch.intra(mode), v, mode=mode) + dot(ch.e_in * ch.qs, S_in, mode=mode)
    o_ref[...] = o.astype(o_ref.dtype)
    S_ref[...] = ch.a_col * S_in + dot(ch.e_out * ch.kf, v, ta=True,
                                       mode="split" if mode == "fast" else mode)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sT_ref[...] = S_ref[...]


def _diag_bwd(ch, a, dAm, e_ref):
    """Gradients of the diagonal sub-chunk a: (dL/dqs, dL/dk, dL/dg) rows of the sub-chunk."""
    C, c, K = ch.C, ch.c, ch.g.shape[1]
    sl = slice(a * c, (a + 1) * c)
    qa, ka, dA = ch.qs[sl], ch.kf[sl], dAm[sl]
    r = lax.broadcasted_iota(jnp.int32, (c, K), 0)
    lanes = lax.broadcasted_iota(jnp.int32, (c, C), 1)
    E = jnp.zeros((c, K), F32)
    for j in reversed(range(c)):
        E = ch.diag_E(a, j, E, r)
        e_ref[j] = E
    dq, dk, dg, acc = (jnp.zeros((c, K), F32) for _ in range(4))
    for j in range(c):
        ex = jnp.exp(e_ref[j])
        kj = _row(ka, r, j)
        dcol = jnp.sum(jnp.where(lanes == a * c + j, dA, 0.0), axis=1, keepdims=True)
        X = qa * ex
        dq = dq + dcol * ex * kj
        dk = dk + jnp.where(r == j, jnp.sum(dcol * X, axis=0, keepdims=True), 0.0)
        acc = acc + jnp.where(r > j, dcol * X * kj, 0.0)
        if j + 1 < c:   # dg_{j+1}: pairs (i >= j+1, j' <= j) of this sub-chunk
            dg = dg + jnp.where(r == j + 1,
                                jnp.sum(jnp.where(r > j, acc, 0.0), axis=0, keepdims=True), 0.0)
    return dq, dk, dg


def _bwd_kernel(*refs, C, scale, docs, mode, cfg):
    c = _sub(C, cfg)
    ch, v_ref, rest = _setup(refs, docs, C, c, scale, reverse=True)
    sc_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref, dS_ref, e_ref = rest
    m = pl.program_id(2)

    @pl.when(m == 0)
    def _():
        dS_ref[...] = dsT_ref[...]

    v, do = v_ref[...], do_ref[...]
    S_in, dS = sc_ref[...], dS_ref[...]
    K = ch.g.shape[1]

    A = ch.intra(mode)
    dAm = jnp.where(ch.same, dot(do, v, tb=True, mode=mode), 0.0)
    kg = ch.e_out * ch.kf
    dv_ref[...] = (dot(A, do, ta=True, mode=mode) + dot(kg, dS, mode=mode)).astype(dv_ref.dtype)

    # off-diagonal sub-chunk blocks
    dqs, dkt, dGloc = (jnp.zeros((C, K), F32) for _ in range(3))
    dtot = [jnp.zeros((1, K), F32) for _ in range(ch.s)]
    for b in range(ch.s - 1):
        ex = jnp.exp(ch.e_off(b))
        Qb = ch.qs * ex
        dAb = jnp.where(ch.block(b), dAm, 0.0)
        dQb = dot(dAb, ch.kt, mode=mode)
        dkt = dkt + dot(dAb, Qb, ta=True, mode=mode)
        dqs = dqs + dQb * ex
        dEb = dQb * Qb
        dGloc = dGloc + dEb
        for a in range(b + 2, ch.s):   # E_b rows of sub-chunk a hold tot_m for b < m < a
            d_off = jnp.sum(dEb[a * c:(a + 1) * c], axis=0, keepdims=True)
            for mm in range(b + 1, a):
                dtot[mm] = dtot[mm] + d_off
    dk = dkt * jnp.exp(ch.Rloc)
    dRloc = dkt * ch.kt

    diag = [_diag_bwd(ch, a, dAm, e_ref) for a in range(ch.s)]
    dqs = dqs + jnp.concatenate([d[0] for d in diag], axis=0)
    dk = dk + jnp.concatenate([d[1] for d in diag], axis=0)
    dg = jnp.concatenate([d[2] + jnp.broadcast_to(dtot[a], (c, K)) for a, d in enumerate(diag)],
                         axis=0)

    # inter-chunk terms
    dq_in = dot(do, S_in, tb=True, mode=mode)
    dk_out = dot(v, dS, tb=True, mode=mode)
    qg = ch.e_in * ch.qs
    dqs = dqs + ch.e_in * dq_in
    dk = dk + ch.e_out * dk_out
    ones = jnp.ones((8, S_in.shape[1]), F32)
    d_tot = ch.a_row * dot(ones, S_in * dS, tb=True, mode="mask")[0:1]   # dL/dGtot  [1, K]
    d_spans = jnp.concatenate([qg * dq_in, kg * dk_out, dGloc, dRloc], axis=0)
    dg = dg + dot(ch.M, d_spans, ta=True, mode="mask") + d_tot

    dq_ref[...] = (scale * dqs).astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dg_ref[...] = dg
    dS_ref[...] = ch.a_col * dS + dot(qg, do, ta=True, mode="split" if mode == "fast" else mode)

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dS_ref[...]


def _bwd_scratch(C, Kp, Vp, cfg):
    c = _sub(C, cfg)
    return [mosaic.vmem((c, c, Kp))]


_KERNEL = KernelDef("gla", vector_gate=True, fwd=_fwd_kernel, bwd=_bwd_kernel,
                    bwd_scratch=_bwd_scratch)


def gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size,
        config: TpuConfig | None = None):
    """Same contract as `linear_jax.ops.gla.gla_chunk` (heads expanded, inputs validated): returns
    o [B, T, H, V] in v's dtype and S [B, H, K, V] float32."""
    return run(_KERNEL, q, k, v, g, scale=scale, initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size, config=config)
