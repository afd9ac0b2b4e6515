"""Intra-chunk blocks of the vector-gated (GLA) decay: A forward; dq, dk and the pairs' dg backward.

    A_ij = scale * sum_k q_ik k_jk exp(D_ijk),   D_ijk = sum_{j<s<=i} g_sk,   j <= i in one document

exp(D) cannot be split through one reference point of the chunk without factors > 1 that overflow
at strong decay, so the chunk is cut into sub-chunks of c rows (the GLA paper's secondary
chunking). A block of queries in sub-chunk a and keys in b < a factors through the end e_b of
sub-chunk b, both factors <= 1: one matmul per block. A diagonal block is summed elementwise in K
one key column j at a time. Where a chunk's decay is mild (every channel's summed gate >=
-span_limit: logsigmoid gates / 16 sum to about -3 over 64 rows, the common case) the blocks need
no reference points: exp(D_ij) = exp(G_i) exp(-G_j) (G the chunk's prefix sums) with both factors
in [e^-60, e^60], far inside the operand type's range, so a row block of A (and dq, dk) is one
matmul through the chunk start. The test is made per chunk at run time. The forward forms its
factors from the prefix sums G (values only, `common`).

Backward, with P_ijk = scale dA_ij q_ik k_jk exp(D_ijk) the pair gradients (dA = do u^T masked)
and dg_sk = sum_{i>=s>j} P_ijk, every pair routed to exactly the gates of its span. In the blocked
form the spans are those of `linear_jax.kernels.tiles`, sums of exactly their gates: for a block,
D_ij = Rloc_j + mid(b, a) + Gloc_i (Rloc_j = span (j, e_b], mid the sub-chunks strictly between,
Gloc_i = span [start of a, i]); inside a diagonal block E_j = span (j, i], a 0/1 product with the
sub-chunk's gates. For the rows of sub-chunk a (one program):

    query side, keys j before a:  dEq_i = sum_{j<start a} P_ij  -> gates s <= i of a (U_c @ dEq)
    key side, queries i after a:  dEk_j = sum_{i>end a} P_ij    -> gates s > j of a (L_c @ dEk)
    around a, j before and i after:  sum of those P               -> every gate of a
    inside a: key column j ascending, acc_i += P_ij (i > j);      dg_{j+1} = sum_{i>j} acc_i

plus the per-row terms `decay._backward_main` already routed (dg_p). The same sums give dq, dk.
Nothing is subtracted, so dg stays exact at strong decay. (In mild chunks P is formed through the
chunk start, exp(G_i) exp(-G_j), accurate to 120 eps, and routed the same way.) Grid (B*H, N,
C/c): each program owns the c rows of one sub-chunk (its row block of A; its dq, dk, dg) and loops
(not unrolled) over the blocks it needs. Added work for the exact gate gradient, per program at
c = 16, C = 64, K = 128: the blocks around a (2 [c, c] x [c, K] products for the middle
sub-chunks, one [C, C] x [C, K] product in mild chunks), c 0/1 products [c, c] x [c, K] for the
diagonal spans (blocked form), and O(c K) sums per diagonal column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.common import F32


def span_limit(dtype) -> float:
    """Largest chunk decay (in log space) taken by the one-matmul path: exp(SPAN) and exp(-SPAN)
    stay normal numbers in the dot operands' type (float16's range is e^+-11)."""
    return 8.0 if dtype == jnp.float16 else 60.0


def _mild(G_ref, C, dtype):
    """The chunk's decay is mild: every channel's summed gate (the prefix sums' last row) >=
    -span_limit."""
    return jnp.min(G_ref[pl.ds(C - 1, 1), :]) >= -span_limit(dtype)


def _sub_rows(H, c, s, X):
    """[B, T, H, X] blocks of the c rows of sub-chunk a = g[1] of chunk n = g[0]."""
    return pl.BlockSpec((None, c, None, X), lambda bh, n, a: (bh // H, n * s + a, bh % H, 0))


def _chunk_rows(H, C, X):
    return pl.BlockSpec((None, C, None, X), lambda bh, n, a: (bh // H, n, bh % H, 0))


class _Spans:
    """The gate spans of sub-chunk blocks, from the chunk's gates g_ref [C, K] (module docstring).
    Every span is a 0/1 product or masked sum of exactly its gates."""

    def __init__(self, ctx, g_ref, c):
        self.ctx, self.g_ref, self.c, C = ctx, g_ref, c, ctx.C
        iota = lambda shape, d: lax.broadcasted_iota(jnp.int32, shape, d)
        self.rr, self.cc, self.rc = iota((c, c), 0), iota((c, c), 1), iota((c, 1), 0)
        self.rC = iota((C, 1), 0)

    def rows(self, m):
        return self.g_ref[pl.ds(m * self.c, self.c), :]

    def gloc(self, m):
        """span [start of m, i] for the rows i of sub-chunk m."""
        return self.ctx.mask_dot((self.rr >= self.cc).astype(F32), self.rows(m))

    def rloc(self, m):
        """span (j, end of m] for the rows j of sub-chunk m."""
        return self.ctx.mask_dot((self.rr < self.cc).astype(F32), self.rows(m))

    def mid(self, b, a):
        """The gates of the sub-chunks strictly between b and a, [1, K]."""
        inside = (self.rC >= (b + 1) * self.c) & (self.rC < a * self.c)
        return jnp.sum(jnp.where(inside, self.g_ref[...], 0.0), axis=0, keepdims=True)

    def diag(self, a, j):
        """exp(span (j, i]) [c, K] for the rows i >= j of sub-chunk a, 0 above."""
        m = ((self.cc > j) & (self.cc <= self.rr)).astype(F32)
        E = self.ctx.mask_dot(m, self.rows(a))
        return jnp.exp(jnp.where(self.rc >= j, E, -jnp.inf))


def intra_forward(ctx, q, k, G, doc, *, scale):
    """A [B, Tp, H, C] float32, masked (causal, same document) and scaled, from the gates' prefix
    sums G (values only, `common`): a block of queries a and keys b < a through R = G_{end b},
    exp(G_i - R) * exp(R - G_j); the diagonal blocks one key column at a time; mild chunks by one
    matmul through the chunk start."""
    B, Tp, H, Kp = q.shape
    C, c = ctx.C, ctx.cfg.sub_chunk
    s, cd = C // c, q.dtype

    def kernel(q_ref, k_ref, g_ref, doc_ref, a_ref):
        n, a = pl.program_id(1), pl.program_id(2)
        r = jnp.arange(c, dtype=jnp.int32)
        rows_a = pl.ds(a * c, c)
        qa, Ga = q_ref[rows_a, :].astype(F32), g_ref[rows_a, :]
        da = doc_ref[pl.ds(n * C + a * c, c)] if ctx.has_seg else None

        def same_doc(blk, b):
            if not ctx.has_seg:
                return blk
            db = doc_ref[pl.ds(n * C + b * c, c)]
            return jnp.where(da[:, None] == db[None, :], blk, 0.0)

        def off_diagonal(b, carry):            # keys of sub-chunk b < a, through R = G_{end b}
            rows_b = pl.ds(b * c, c)
            R = g_ref[pl.ds(b * c + c - 1, 1), :]
            kb = (k_ref[rows_b, :].astype(F32) * jnp.exp(R - g_ref[rows_b, :])).astype(cd)
            blk = ctx.dot((qa * jnp.exp(Ga - R)).astype(cd), kb, tb=True)
            a_ref[:, pl.ds(b * c, c)] = same_doc(blk, b) * scale
            return carry

        def diagonal(j, blk):                   # key column j of the diagonal block
            t = pl.ds(a * c + j, 1)
            e = jnp.exp(jnp.where(r[:, None] >= j, Ga - g_ref[t, :], -jnp.inf))
            col = jnp.sum(qa * k_ref[t, :].astype(F32) * e, axis=1)
            return blk + jnp.where(r[None, :] == j, col[:, None], 0.0)

        def above(b, carry):
            a_ref[:, pl.ds(b * c, c)] = jnp.zeros((c, c), F32)
            return carry

        def blocked():
            jax.lax.fori_loop(0, a, off_diagonal, 0)
            blk = jax.lax.fori_loop(0, c, diagonal, jnp.zeros((c, c), F32))
            a_ref[:, pl.ds(a * c, c)] = same_doc(blk, a) * scale
            jax.lax.fori_loop(a + 1, s, above, 0)

        def one_matmul():
            kf = (k_ref[...].astype(F32) * jnp.exp(-g_ref[...])).astype(cd)
            blk = ctx.dot((qa * jnp.exp(Ga)).astype(cd), kf, tb=True)
            mask = (a * c + r)[:, None] >= jnp.arange(C, dtype=jnp.int32)[None, :]
            if ctx.has_seg:
                mask = mask & (da[:, None] == doc_ref[pl.ds(n * C, C)][None, :])
            a_ref[...] = jnp.where(mask, blk, 0.0) * scale

        jax.lax.cond(_mild(g_ref, C, cd), one_matmul, blocked)

    return ctx.call(
        kernel, grid=(B * H, Tp // C, s),
        in_specs=[_chunk_rows(H, C, Kp)] * 3 + [common.doc_spec(H, Tp)],
        out_specs=_sub_rows(H, c, s, C),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), F32),
        warps=ctx.cfg.warps_intra, stages=1, name="gla_intra_forward",
    )(q, k, G, doc)


def intra_backward(ctx, q, k, g, G, dA, dq_p, dk_p, *dg_p, scale):
    """dq, dk (input dtypes) and dg (float32) from dA and the inter-chunk parts; g the gates, G
    their prefix sums (the mild path's factors). dg_p: the inter-chunk kernel's dg part (one
    array, gla_bwd="dots"), or its per-row terms dGin, dR (two, "rows"), routed here: the rows of
    sub-chunk a by the same 0/1 products as the pairs' dEq / dEk, the rows of the other sub-chunks
    as column sums (all of dGin after a, all of dR before a reach every gate of a)."""
    B, Tp, H, Kq = q.shape
    C, c = ctx.C, ctx.cfg.sub_chunk
    s, cd = C // c, q.dtype
    rows_in = len(dg_p) == 2
    # every term here is per key channel but dA, so the programs can split K: smaller tiles a
    # program (the diagonal loop's cross-row sums span fewer warps), more programs on the SMs
    Kp = min(ctx.cfg.block_k_intra, Kq)

    def kernel(q_ref, k_ref, g_ref, G_ref, da_ref, dqp_ref, dkp_ref, *refs):
        if rows_in:
            dgin_ref, dr_ref, dq_ref, dk_ref, dg_ref = refs
        else:
            dgp_ref, dq_ref, dk_ref, dg_ref = refs
        a = pl.program_id(0)
        sp = _Spans(ctx, g_ref, c)
        r = lax.broadcasted_iota(jnp.int32, (c, Kp), 0)
        rows_a = pl.ds(a * c, c)
        qa, ka = q_ref[rows_a, :].astype(F32), k_ref[rows_a, :].astype(F32)
        zero = jnp.zeros((c, Kp), F32)

        def diag_step(factors, grads=True):
            """Key column j of the diagonal block: factors(j) -> (Ed [c, K], the span factor of
            the rows i >= j, 0 above; qx [c, K]; kx [1, K]) with P_ij = dA_ij qx_i Ed_i kx; dq and
            dk only with `grads`."""
            def step(j, carry):
                dq, dk, dg, acc = carry
                Ed, qx, kx = factors(j)
                dcol = da_ref[rows_a, pl.ds(a * c + j, 1)]                   # dA[i, j], [c, 1]
                X = qx * Ed
                if grads:
                    dq = dq + dcol * Ed * kx
                    dk = dk + jnp.where(r == j, jnp.sum(dcol * X, axis=0, keepdims=True), 0.0)
                acc = acc + jnp.where(r > j, dcol * X * kx, 0.0)
                dg = dg + jnp.where(r == j + 1, jnp.sum(jnp.where(r > j, acc, 0.0), axis=0,
                                                        keepdims=True), 0.0)
                return dq, dk, dg, acc
            return step

        def blocked(diag=True):
            Gloc_a, Rloc_a = sp.gloc(a), sp.rloc(a)
            kt_a = ka * jnp.exp(Rloc_a)

            def keys_before(b, carry):          # queries a, keys b < a
                dq, dEq = carry
                rows_b = pl.ds(b * c, c)
                kb = (k_ref[rows_b, :].astype(F32) * jnp.exp(sp.rloc(b))).astype(cd)
                ex = jnp.exp(Gloc_a + sp.mid(b, a))
                Y = ctx.dot(da_ref[rows_a, rows_b].astype(cd), kb)
                return dq + Y * ex, dEq + qa * ex * Y

            def q_after(a2, b):                 # queries of a2 > b, factored through the end of b
                return q_ref[pl.ds(a2 * c, c), :].astype(F32) * jnp.exp(sp.gloc(a2)
                                                                        + sp.mid(b, a2))

            def queries_after(a2, carry):       # queries a2 > a, keys a; and around a
                dk, dEk, around = carry
                Z = ctx.dot(da_ref[pl.ds(a2 * c, c), rows_a].astype(cd),
                            q_after(a2, a).astype(cd), ta=True)

                def keys_before_a(b, tot):
                    kb = (k_ref[pl.ds(b * c, c), :].astype(F32) * jnp.exp(sp.rloc(b)))
                    Qb = q_after(a2, b)
                    Y = ctx.dot(da_ref[pl.ds(a2 * c, c), pl.ds(b * c, c)].astype(cd),
                                kb.astype(cd))
                    return tot + jnp.sum(Qb * Y, axis=0, keepdims=True)

                around = jax.lax.fori_loop(0, a, keys_before_a, around)
                return dk + Z * jnp.exp(Rloc_a), dEk + kt_a * Z, around

            dq, dEq = jax.lax.fori_loop(0, a, keys_before, (zero, zero))
            dk, dEk, around = jax.lax.fori_loop(a + 1, s, queries_after,
                                                (zero, zero, jnp.zeros((1, Kp), F32)))
            if not diag:
                return dq, dk, None, dEq, dEk, around
            factors = lambda j: (sp.diag(a, j), qa, k_ref[pl.ds(a * c + j, 1), :].astype(F32))
            dq2, dk2, dg, _ = jax.lax.fori_loop(0, c, diag_step(factors), (zero,) * 4)
            return dq + dq2, dk + dk2, dg, dEq, dEk, around

        def one_matmul():                       # dA is masked already
            Gin, Gin_a = G_ref[...], G_ref[rows_a, :]
            qf = (q_ref[...].astype(F32) * jnp.exp(Gin))
            kf = (k_ref[...].astype(F32) * jnp.exp(-Gin))
            rowC = lax.broadcasted_iota(jnp.int32, (C, C), 0)
            colC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
            da_rows, da_cols = da_ref[rows_a, :], da_ref[:, rows_a]
            colc = lax.broadcasted_iota(jnp.int32, (c, C), 1)
            before = jnp.where(colc < a * c, da_rows, 0.0).astype(cd)         # keys before a
            rowc = lax.broadcasted_iota(jnp.int32, (C, c), 0)
            after = jnp.where(rowc >= (a + 1) * c, da_cols, 0.0).astype(cd)   # queries after a
            Y = ctx.dot(before, kf.astype(cd))
            Z = ctx.dot(after, qf.astype(cd), ta=True)
            ring = (rowC >= (a + 1) * c) & (colC < a * c)
            Yr = ctx.dot(jnp.where(ring, da_ref[...], 0.0).astype(cd), kf.astype(cd))
            around = jnp.sum(qf * Yr, axis=0, keepdims=True)
            qx, kx_a = qa * jnp.exp(Gin_a), ka * jnp.exp(-Gin_a)
            dq = ctx.dot(da_rows.astype(cd), kf.astype(cd)) * jnp.exp(Gin_a)
            dk = ctx.dot(da_cols.astype(cd), qf.astype(cd), ta=True) * jnp.exp(-Gin_a)
            dEq, dEk = qx * Y, kx_a * Z

            def factors(j):
                kx = jnp.sum(jnp.where(r == j, kx_a, 0.0), axis=0, keepdims=True)
                return jnp.where(r >= j, 1.0, 0.0), qx, kx

            _, _, dg, _ = jax.lax.fori_loop(0, c, diag_step(factors, grads=False), (zero,) * 4)
            return dq, dk, dg, dEq, dEk, around

        # ---- the diagonal block as [c, c, BK] tiles (gla_diag="scan") ----
        i3 = lax.broadcasted_iota(jnp.int32, (c, c, 1), 0)
        j3 = lax.broadcasted_iota(jnp.int32, (c, c, 1), 1)

        def diag_routes(P3):
            """dg of the diagonal pairs P3 [c, c, BK] (i query, j key; only i > j is read):
            sum_{i>=s>j} P_ij as a running sum along each query row's keys, W_it = sum_{j<=t}
            P_ij, then u_t = sum_{i>t} W_it, which is dg one row early (a 0/1 product puts it
            back). Nothing is subtracted."""
            W = lax.cumsum(jnp.where(i3 > j3, P3, 0.0), axis=1)
            u = jnp.sum(jnp.where(i3 > j3, W, 0.0), axis=0)
            return ctx.mask_dot((sp.rr == sp.cc + 1).astype(F32), u)

        def blocked3():
            dq, dk, _, dEq, dEk, around = blocked(diag=False)
            g_a = g_ref[rows_a, :]
            D3 = lax.cumsum(jnp.where(i3 > j3, g_a[:, None, :], 0.0), axis=0)   # span (j, i]
            dA_aa = da_ref[rows_a, rows_a]
            X3 = dA_aa[:, :, None] * jnp.exp(jnp.where(i3 >= j3, D3, -jnp.inf))
            R3 = X3 * qa[:, None, :]
            dq = dq + jnp.sum(X3 * ka[None, :, :], axis=1)
            dk = dk + jnp.sum(R3, axis=0)
            return dq, dk, diag_routes(R3 * ka[None, :, :]), dEq, dEk, around

        def mild3():                            # dA is masked already
            Gin_a = G_ref[rows_a, :]
            ein_a = jnp.exp(Gin_a)
            qx, kx = qa * ein_a, ka * jnp.exp(-Gin_a)
            kf = (k_ref[...].astype(F32) * jnp.exp(-G_ref[...])).astype(cd)
            colc = lax.broadcasted_iota(jnp.int32, (c, C), 1)
            rowc = lax.broadcasted_iota(jnp.int32, (C, c), 0)
            da_rows, da_cols = da_ref[rows_a, :], da_ref[:, rows_a]
            Y = ctx.dot(jnp.where(colc < a * c, da_rows, 0.0).astype(cd), kf)   # keys before a
            qf = (q_ref[...].astype(F32) * jnp.exp(G_ref[...])).astype(cd)
            Z = ctx.dot(jnp.where(rowc >= (a + 1) * c, da_cols, 0.0).astype(cd), qf, ta=True)
            dA_aa = da_ref[rows_a, rows_a].astype(cd)
            dq = (Y + ctx.dot(dA_aa, kx.astype(cd))) * ein_a
            dk = (Z + ctx.dot(dA_aa, qx.astype(cd), ta=True)) * jnp.exp(-Gin_a)

            def ring(a2, tot):                  # queries of a2 > a, keys before a
                rows2 = pl.ds(a2 * c, c)
                Yr = ctx.dot(jnp.where(colc < a * c, da_ref[rows2, :], 0.0).astype(cd), kf)
                q2 = q_ref[rows2, :].astype(F32) * jnp.exp(G_ref[rows2, :])
                return tot + jnp.sum(q2 * Yr, axis=0, keepdims=True)

            around = jax.lax.fori_loop(a + 1, s, ring, jnp.zeros((1, Kp), F32))
            P3 = da_ref[rows_a, rows_a][:, :, None] * qx[:, None, :] * kx[None, :, :]
            return dq, dk, diag_routes(P3), qx * Y, kx * Z, around

        mild = _mild(G_ref, C, cd)
        if ctx.cfg.gla_diag == "scan":
            dq, dk, dg, dEq, dEk, around = jax.lax.cond(mild, mild3, blocked3)
        else:
            dq, dk, dg, dEq, dEk, around = jax.lax.cond(mild, one_matmul, blocked)
        rr, cc = sp.rr, sp.cc
        if rows_in:             # scale the pairs' terms here, so one product routes both kinds
            colsum = lambda ref: lambda b, acc: acc + jnp.sum(ref[pl.ds(b * c, c), :], axis=0,
                                                              keepdims=True)
            rest = jax.lax.fori_loop(a + 1, s, colsum(dgin_ref), jnp.zeros((1, Kp), F32))
            rest = jax.lax.fori_loop(0, a, colsum(dr_ref), rest)
            dEq = dEq * scale + dgin_ref[rows_a, :]
            dEk = dEk * scale + dr_ref[rows_a, :]
            dg, around, dg_rest = dg * scale, around * scale + rest, 0.0
        else:
            dg_rest = dgp_ref[...]
        dg = (dg + ctx.mask_dot((rr <= cc).astype(F32), dEq)
              + ctx.mask_dot((rr > cc).astype(F32), dEk) + around)
        dq_ref[...] = (dq * scale + dqp_ref[...]).astype(dq_ref.dtype)
        dk_ref[...] = (dk * scale + dkp_ref[...]).astype(dk_ref.dtype)
        dg_ref[...] = (dg if rows_in else dg * scale) + dg_rest

    # grid (sub-chunk, K tile, B*H, N): the first two vary fastest in launch order (Pallas
    # collapses the leading axes into CUDA's x), so the programs of one chunk, which read the same
    # q, k, g, G and dA tiles, run together and find them in L2
    chunk = pl.BlockSpec((None, C, None, Kp), lambda a, kt, bh, n: (bh // H, n, bh % H, kt))
    sub = pl.BlockSpec((None, c, None, Kp), lambda a, kt, bh, n: (bh // H, n * s + a, bh % H, kt))
    da = pl.BlockSpec((None, C, None, C), lambda a, kt, bh, n: (bh // H, n, bh % H, 0))
    return ctx.call(
        kernel, grid=(s, Kq // Kp, B * H, Tp // C),
        in_specs=[chunk] * 4 + [da] + [sub] * 2 + (
            [chunk] * 2 if rows_in else [sub]),
        out_specs=[sub] * 3,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(q.shape, F32)],
        warps=ctx.cfg.warps_intra_bwd, stages=1, name="gla_intra_backward",
    )(q, k, g, G, dA, dq_p, dk_p, *dg_p)
