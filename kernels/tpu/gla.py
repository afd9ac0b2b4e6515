"""GLA (log-decay per head, step and key channel) as Mosaic TPU kernels, forward and backward.

The math is `linear_jax.ops.common.decay_chunk` for a vector gate g [C, K] per chunk. The chunk's
span sums are exact 0/1 products with g (`tiles.vector_gate_terms` for the chunk's, one stacked
product for the sub-chunks'):

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

from linear_jax.kernels import tiles
from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import mosaic
from linear_jax.kernels.tpu._decay import KernelDef, run
from linear_jax.kernels.tpu.mosaic import F32, dot
from linear_jax.kernels.tpu.simple_gla import mask_dot, state_step


def _sub(C, cfg):
    return math.gcd(C, cfg.sub_chunk)


def _row(x, r, j):
    """Row j of x [c, K] as [1, K] (a masked sublane sum: exact, and no unaligned slicing)."""
    return jnp.sum(jnp.where(r == j, x, 0.0), axis=0, keepdims=True)


class _Chunk:
    """Span sums and decay factors of one chunk, shared by the forward and backward bodies."""

    def __init__(self, ch, c, scale):
        g, C = ch.g[...], ch.row.shape[0]
        self.C, self.c, self.s = C, c, C // c
        self.row, self.col = ch.row, ch.col
        sh = c.bit_length() - 1                                            # c is a power of 2
        rs, cs = lax.shift_right_logical(self.row, sh), lax.shift_right_logical(self.col, sh)
        self.rs, self.cs = rs, cs
        same_sub = rs == cs
        lower, upper = self.row >= self.col, self.col > self.row
        self.M = jnp.concatenate([m.astype(F32) for m in (lower & same_sub, upper & same_sub)],
                                 axis=0)
        spans = dot(self.M, g, mode="mask")                                             # [2C, K]
        self.Gloc, self.Rloc = spans[:C], spans[C:]
        self.tot = [jnp.sum(g[m * c:(m + 1) * c], axis=0, keepdims=True) for m in range(self.s)]
        self.same = ch.masks[0]
        self.e_in, self.e_out, self.a_row = tiles.vector_gate_terms(g, ch.masks, self.row,
                                                                    self.col, mask_dot)
        K = g.shape[1]
        e0 = (lax.broadcasted_iota(jnp.int32, (8, 128), 0) == 0).astype(F32)
        self.a_col = jnp.max(dot(jnp.broadcast_to(self.a_row, (8, K)), e0, ta=True), axis=1,
                             keepdims=True)                                # [K, 1]
        self.g = g
        self.qs = scale * ch.q[...].astype(F32)
        self.kf = ch.k[...].astype(F32)
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


def _fwd(ch, o_ref, S_in, extra, *, C, scale, mode, cfg):
    t = _Chunk(ch, _sub(C, cfg), scale)
    o = dot(t.intra(mode), ch.v[...], mode=mode) + dot(t.e_in * t.qs, S_in, mode=mode)
    o_ref[...] = o.astype(o_ref.dtype)
    return t.a_col * S_in + dot(t.e_out * t.kf, ch.v[...], ta=True, mode=state_step(mode))


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


def _bwd(chunk, S_in, do, dS, outs, extra, *, C, scale, mode, cfg):
    c = _sub(C, cfg)
    ch = _Chunk(chunk, c, scale)
    dq_ref, dk_ref, dv_ref, dg_ref = outs
    (e_ref,) = extra
    v = chunk.v[...]
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
    dg = (dg + tiles.vector_gate_grad(qg * dq_in, kg * dk_out, d_tot, ch.row, ch.col, mask_dot)
          + dot(ch.M, jnp.concatenate([dGloc, dRloc], axis=0), ta=True, mode="mask"))

    dq_ref[...] = (scale * dqs).astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dg_ref[...] = dg
    return ch.a_col * dS + dot(qg, do, ta=True, mode=state_step(mode))


def _bwd_scratch(C, Kp, Vp, cfg):
    c = _sub(C, cfg)
    return [mosaic.vmem((c, c, Kp))]


_KERNEL = KernelDef("gla", vector_gate=True, fwd=_fwd, bwd=_bwd, bwd_scratch=_bwd_scratch)


def gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size,
        config: TpuConfig | None = None):
    """Same contract as `linear_jax.ops.gla.gla_chunk` (heads expanded, inputs validated), plus the
    kernel config (the registry always passes one; None takes `TpuConfig.default()`): returns
    o [B, T, H, V] in v's dtype and S [B, H, K, V] float32."""
    return run(_KERNEL, q, k, v, g, scale=scale, initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size, config=config)
