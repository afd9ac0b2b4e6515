"""The Hopper mLSTM backward kernels: the intra-chunk output's VJP with the normaliser inside
(`mlstm`'s docstring has the math; rows and pair factor as `mlstm_fwd`). Two kernels, both on the
forward's grid (B, H, Tp / 64), one warpgroup per 64-row tile, each reading the L / 64 tiles of its
chunk that its tile pairs with (key tiles after a query tile are masked, not skipped, as forward):

  queries (`grad_queries`, tile t as queries): the normaliser's VJP per row, from dh, h and the
    forward's den (dnum = dh / denom, dden, and the floor's d(-m)); dq (the entering state's term
    and dS k over the key tiles); the row terms dm (of a = F - m, w and the floor) and w dw; the
    entering state's cotangents (w q)^T dnum and sum_i w_i dden_i q_i, one partial per query tile
    (summed over the chunk's tiles in XLA); and the pair gradients Z = dP * P routed to the forget
    gates of their spans: row s of the chunk gets sum_{i >= s > j} Z_ij over this tile's rows i
    (X = Z U on wgmma, U the strictly upper 0/1 matrix, Z in two bf16 halves; whole earlier key
    tiles as row sums), one partial per query tile.
  keys (`grad_keys`, tile t as keys, the pair tiles transposed): dk = dS^T q, dv = P^T dnum and
    db = sum_i Z_ij (the input gate's pair term), dnum formed again from dh and the queries'
    1 / denom.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.gpu.hopper.common import LANES, f32, pl, plgpu, prod, smem
from linear_jax.kernels.gpu.hopper.mlstm_fwd import (
    KEY0,
    chunk_of,
    copy_key_tiles,
    kernel_of,
    pair_factor,
    tile_setup,
)
from linear_jax.ops.common.normalise import MAX_LOG_FLOOR

# rows the query kernel writes, [B, H, 4, Tp]: dL/dm through a, w and the floor; w dL/dw; the
# normaliser's 1 / denom and dL/dden (the key kernel reads the last two)
QROWS = ("dm", "wdw", "inv", "dden")


def grad_queries(q, k, v, dh, hv, rows, den, Cin, nin, *, L, eps, cfg):
    """dq [B, Tp, H, K] (q's dtype), the rows `QROWS` [B, H, 4, Tp], the forget-gate pair terms
    [B, H, NQ, NT, 64], and the entering state's partial cotangents dC [B, H, NQ, K, V], dn
    [B, H, NQ, K] (float32; NQ = Tp / 64 query tiles, NT = L / 64 per chunk)."""
    B, Tp, H, K, V, dt, R, NQ, NT, docs, ops = tile_setup(q, v, rows, L, cfg)
    C = LANES
    shape, sq = (C, V), (C, C)

    def body(q_ref, k_ref, v_ref, dh_ref, h_ref, r_ref, den_ref, c_ref, n_ref,
             dq_ref, qr_ref, x_ref, dc_ref, dn_ref, *refs):
        qs, dhs, hs = refs[:3]
        ks, vs = refs[3:3 + NT], refs[3 + NT:3 + 2 * NT]
        rs, kr, dens, cs, ns, dns, qws, us, stage, ors, xs, dnv, bar = refs[3 + 2 * NT:]
        b, h, t = (lax.axis_index(x) for x in ("b", "h", "t"))
        chunk, first, qt = chunk_of(t, NT)
        tq = pl.ds(t * C, C)
        for src, dst in ((q_ref.at[b, tq, h], qs), (dh_ref.at[b, tq, h], dhs),
                         (h_ref.at[b, tq, h], hs), (r_ref.at[b, h, :, tq], rs),
                         (den_ref.at[b, h, :, tq], dens), (c_ref.at[b, h, chunk], cs),
                         (n_ref.at[b, h, pl.ds(chunk, 1)], ns)):
            plgpu.copy_gmem_to_smem(src, dst, bar.at[0])
        copy_key_tiles(k_ref, v_ref, r_ref, ks, vs, kr, b, h, first, NT, bar.at[0])
        r, c = ops.iota(sq, 0), ops.iota(sq, 1)
        us[...] = (r < c).astype(dt)                              # U_js = [j < s]
        plgpu.barrier_wait(bar.at[0])

        # the normaliser: h = num / denom, denom = max(|den|, exp(-m)) + eps
        w = ops.row(rs.at[1][...])
        negm = ops.row(rs.at[2][...])
        den = ops.row(dens.at[0][...])
        floor = jnp.exp(jnp.minimum(negm, MAX_LOG_FLOOR))
        big = jnp.abs(den) >= floor
        inv = 1.0 / (jnp.maximum(jnp.abs(den), floor) + eps)
        dhf = ops.acc(dhs[...]).astype(f32)
        g = -jnp.sum(dhf * ops.acc(hs[...]).astype(f32), axis=1) * inv   # dL/d denom
        dden = jnp.where(big, jnp.where(den < 0, -g, g), 0.0)
        dfloor = jnp.where(big | (negm > MAX_LOG_FLOOR), 0.0, g * floor)   # dL/d(-m)
        dns[...] = (dhf * ops.rows_of(inv, shape)).astype(dt)
        qws[...] = (ops.acc(qs[...]).astype(f32) * ops.rows_of(w, (C, K))).astype(dt)
        plgpu.commit_smem()
        # from here on q and dnum are read back from SMEM where needed (dnum as the bf16 operand
        # the products use), so that no [64, K | V] float32 tile stays live for long

        # the entering state: its cotangents (per 64 x 64 block, staged in float32), dq's term
        for kb in range(K // LANES):
            for vb in range(V // LANES):
                kr_, vr = pl.ds(kb * LANES, LANES), pl.ds(vb * LANES, LANES)
                (blk,) = ops.mm(prod(qws.at[:, kr_], dns.at[:, vr], ta=True))
                if kb or vb:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                stage[...] = blk
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(stage, dc_ref.at[b, h, t, kr_, vr])
        (qC,) = ops.mm(prod(qs, cs))
        nin = ops.col(ns.at[0][...])
        qf = ops.acc(qs[...]).astype(f32)
        wdw = w * (jnp.sum(ops.acc(dns[...]).astype(f32) * qC, axis=1)
                   + dden * jnp.sum(qf * ops.cols_of(nin, (C, K)), axis=1))
        dnv[0] = jnp.sum(qf * ops.rows_of(w * dden, (C, K)), axis=0)
        (dqi,) = ops.mm(prod(dns, cs, tb=True))
        dq = ops.rows_of(w, (C, K)) * (dqi + ops.rows_of(dden, (C, K)) * ops.cols_of(nin, (C, K)))

        # the key tiles of the chunk
        # row vectors broadcast inside the loop, so the [64, 64] tiles live one iteration only
        a = ops.row(rs.at[0][...])
        dq_doc = ops.row(rs.at[KEY0 + 1][...]) if docs else None
        da = r_acc = ops.row(jnp.zeros((C,), f32))
        for j in range(NT):
            S, dPv = ops.mm(prod(qs, ks[j], tb=True), prod(dns, vs[j], tb=True))
            bj = ops.cols_of(ops.col(kr.at[j, 0][...]), sq)
            dk_doc = ops.cols_of(ops.col(kr.at[j, 1][...]), sq) if docs else None
            E = pair_factor(ops, ops.rows_of(a, sq), bj, r + t * C, c + (first + j) * C,
                            ops.rows_of(dq_doc, sq) if docs else None, dk_doc)
            dP = dPv + ops.rows_of(dden, sq)
            Z = dP * S * E
            hi = Z.astype(dt)
            # dq accumulates in its own registers (no second [64, K] tile)
            dq, X1, X2 = ops.mm(prod((dP * E).astype(dt), ks[j], dq), prod(hi, us),
                                prod((Z - hi.astype(f32)).astype(dt), us))
            rz = jnp.sum(Z, axis=1)
            da = da + rz
            # pairs (i, j') with j' < s <= i: this tile's X, plus all of the earlier key tiles'
            X = X1 + X2 + ops.rows_of(r_acc, sq)
            full = jnp.sum(X, axis=0)                             # s in an earlier tile
            diag = jnp.sum(jnp.where(r >= c, X, 0.0), axis=0)     # s in this query tile
            # a scalar predicate would need an implicit broadcast (no warpgroup lowering)
            before, here = (qt > j).astype(f32), (qt == j).astype(f32)
            xs[j] = before * full + here * diag
            r_acc = r_acc + before * rz

        ors[0] = -(da + wdw + dfloor)
        ors[1] = wdw
        ors[2] = inv
        ors[3] = dden
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        # dq [C, K] leaves through h's [C, V] tile where K == V, else through q's (dead by now)
        dqs = hs if K == V else qs
        dqs[...] = dq.astype(dt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dqs, dq_ref.at[b, tq, h])
        plgpu.copy_smem_to_gmem(ors, qr_ref.at[b, h, :, tq])
        plgpu.copy_smem_to_gmem(xs, x_ref.at[b, h, t])
        plgpu.copy_smem_to_gmem(dnv, dn_ref.at[b, h, pl.ds(t, 1)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [smem((C, K), dt), smem((C, V), dt), smem((C, V), dt)]
    scratch += [smem((C, K), dt) for _ in range(NT)] + [smem((C, V), dt) for _ in range(NT)]
    scratch += [plgpu.SMEM((R, C), f32), plgpu.SMEM((NT, R - KEY0, C), f32),
                plgpu.SMEM((1, C), f32), smem((K, V), dt), plgpu.SMEM((1, K), f32),
                smem((C, V), dt), smem((C, K), dt), smem(sq, dt), smem((LANES, LANES), f32),
                plgpu.SMEM((len(QROWS), C), f32), plgpu.SMEM((NT, C), f32),
                plgpu.SMEM((1, K), f32),
                plgpu.Barrier(num_arrivals=7 + 3 * NT, num_barriers=1)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt),
                jax.ShapeDtypeStruct((B, H, len(QROWS), Tp), f32),
                jax.ShapeDtypeStruct((B, H, NQ, NT, C), f32),
                jax.ShapeDtypeStruct((B, H, NQ, K, V), f32),
                jax.ShapeDtypeStruct((B, H, NQ, K), f32)]
    kernel = kernel_of(body, out_type, (B, H, NQ), scratch, cfg, ops, "mlstm_bwd_queries")
    return kernel(q, k, v, dh, hv, rows, den, Cin, nin)


def grad_keys(q, k, v, dh, rows, qrows, *, L, cfg):
    """dk [B, Tp, H, K], dv [B, Tp, H, V] (the inputs' dtypes) and db = dL/d(i - F) of the pairs
    [B, H, 1, Tp] float32, from the query kernel's rows `QROWS`."""
    B, Tp, H, K, V, dt, R, NQ, NT, docs, ops = tile_setup(q, v, rows, L, cfg)
    C = LANES
    sq = (C, C)

    def body(q_ref, k_ref, v_ref, dh_ref, r_ref, qr_ref, dk_ref, dv_ref, db_ref, *refs):
        ks, vs = refs[:2]
        qs, ds = refs[2:2 + NT], refs[2 + NT:2 + 2 * NT]
        kr, qr, qo, dks, dvs, dbs, bar = refs[2 + 2 * NT:]
        b, h, t = (lax.axis_index(x) for x in ("b", "h", "t"))
        _, first, _ = chunk_of(t, NT)
        tk = pl.ds(t * C, C)
        plgpu.copy_gmem_to_smem(k_ref.at[b, tk, h], ks, bar.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[b, tk, h], vs, bar.at[0])
        plgpu.copy_gmem_to_smem(r_ref.at[b, h, pl.ds(KEY0, R - KEY0), tk], kr, bar.at[0])
        for i in range(NT):
            tq = pl.ds((first + i) * C, C)
            plgpu.copy_gmem_to_smem(q_ref.at[b, tq, h], qs[i], bar.at[0])
            plgpu.copy_gmem_to_smem(dh_ref.at[b, tq, h], ds[i], bar.at[0])
            plgpu.copy_gmem_to_smem(r_ref.at[b, h, :, tq], qr.at[i], bar.at[0])
            plgpu.copy_gmem_to_smem(qr_ref.at[b, h, pl.ds(2, 2), tq], qo.at[i], bar.at[0])
        plgpu.barrier_wait(bar.at[0])

        r, c = ops.iota(sq, 0), ops.iota(sq, 1)
        bk = ops.rows_of(ops.row(kr.at[0][...]), sq)              # rows: keys, columns: queries
        dk_doc = ops.rows_of(ops.row(kr.at[1][...]), sq) if docs else None
        dk, dv = ops.zeros((C, K)), ops.zeros((C, V))
        db = ops.row(jnp.zeros((C,), f32))
        for i in range(NT):
            inv = ops.row(qo.at[i, 0][...])
            dnum = ops.acc(ds[i][...]).astype(f32) * ops.rows_of(inv, (C, V))
            ds[i][...] = dnum.astype(dt)                          # dh is read: dnum in its place
            plgpu.commit_smem()
            St, dPt = ops.mm(prod(ks, qs[i], tb=True), prod(vs, ds[i], tb=True))
            aq = ops.cols_of(ops.col(qr.at[i, 0][...]), sq)
            dq_doc = ops.cols_of(ops.col(qr.at[i, KEY0 + 1][...]), sq) if docs else None
            Et = pair_factor(ops, aq, bk, c + (first + i) * C, r + t * C, dq_doc, dk_doc)
            dPt = dPt + ops.cols_of(ops.col(qo.at[i, 1][...]), sq)
            Pt = St * Et
            db = db + jnp.sum(dPt * Pt, axis=1)
            dk, dv = ops.mm(prod((dPt * Et).astype(dt), qs[i], dk),
                            prod(Pt.astype(dt), ds[i], dv))
        dks[...] = dk.astype(dt)
        dvs[...] = dv.astype(dt)
        dbs[0] = db
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dks, dk_ref.at[b, tk, h])
        plgpu.copy_smem_to_gmem(dvs, dv_ref.at[b, tk, h])
        plgpu.copy_smem_to_gmem(dbs, db_ref.at[b, h, :, tk])
        plgpu.wait_smem_to_gmem(0)

    scratch = [smem((C, K), dt), smem((C, V), dt)]
    scratch += [smem((C, K), dt) for _ in range(NT)] + [smem((C, V), dt) for _ in range(NT)]
    scratch += [plgpu.SMEM((R - KEY0, C), f32), plgpu.SMEM((NT, R, C), f32),
                plgpu.SMEM((NT, 2, C), f32), smem((C, K), dt), smem((C, V), dt),
                plgpu.SMEM((1, C), f32),
                plgpu.Barrier(num_arrivals=3 + 4 * NT, num_barriers=1)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt),
                jax.ShapeDtypeStruct((B, H, 1, Tp), f32)]
    kernel = kernel_of(body, out_type, (B, H, NQ), scratch, cfg, ops, "mlstm_bwd_keys")
    return kernel(q, k, v, dh, rows, qrows)
