"""The chunk-parallel gradient kernel of simple GLA on Hopper (see `decay`'s docstring for the
math, stages and roofline): dq, dk and the gate gradient of every chunk from q, k, v, do and the
two walks' states S_n, dS_n+1.

Work items (`HopperChunkConfig.grad_items`).
  "split"  one (b, h, chunk) per item, a persistent grid of #SMs CTAs; two compute warpgroups (the
           dq side and the dk side, `_grad_split`) and one producer. Two TMA rings: the chunk's
           q, k, v, do, gate rows (2 slots, 64 KB each at K = V = 128) and the key tiles
           (S_n[tile], dS_n+1[tile]) (2 slots of 32 KB), so the chunk's intra blocks are formed
           once and the key tiles follow one another on them. dq, dk leave per key tile by TMA;
           each side sums its part of the gate gradient in the kernel, dg [B, H, 2, Tp]. SMEM
           at K = V = 128: 192 KB of rings + 24 KB of tiles + rows. Bytes: q, k, v, do, S, dS in
           (536 MB at the anchor shapes), dq, dk out (134 MB): 0.157 ms at 4.3 TB/s; the kernel
           took 0.20 ms on the H200 (one compute warpgroup running both sides took 0.38).
  "tile"   one (b, h, chunk, 64-key tile) per item (run 1): q, k, v, do and the intra blocks once
           per key tile (804 MB in at K = 128); the per-chunk sums leave as stats [K/64, B, H, 4,
           Tp] and `gate_grad_tiles` forms dg in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.configs import multiprocessors
from linear_jax.kernels.gpu.hopper.common import (
    CONSUMER_REGS,
    LANES,
    PRODUCER_REGS,
    ChunkGates,
    Ops,
    check_smem,
    f32,
    grid_item,
    interpreting,
    key_tile_item,
    launch,
    load,
    pl,
    plgpu,
    prod,
    program_items,
    smem,
)


def grad(q, k, v, do, rows, states, dstates, *, names, scale, cfg):
    """dq, dk (q's dtype, [B, Tp, H, K]) and the gate term: dg [B, H, 1, Tp] float32
    ("split": [B, H, 2, Tp], two parts to add) or the stats of `gate_grad_tiles` ("tile"); None
    when not gated.

    q, k [B, Tp, H, K]; v, do [B, Tp, H, V]; rows as `decay.walk`; states / dstates
    [B, H, N, K, V] the S_n and dS_n+1 of each chunk."""
    fn = _grad_split if cfg.grad_items == "split" else _grad_tiles
    return fn(q, k, v, do, rows, states, dstates, names=names, scale=scale, cfg=cfg)


def _setup(q, v, rows, names, cfg, per_chunk):
    B, Tp, H, K = q.shape
    N = Tp // cfg.chunk
    items = B * H * N * (1 if per_chunk else K // LANES)
    progs = min(cfg.grad_programs or multiprocessors(jax.devices()[0]), items)
    gated = "g" in names or "G" in names
    return B, Tp, H, K, v.shape[-1], N, items, progs, rows is not None, gated and rows is not None


def _intra_gate_term(ops, dA, QK, u_ref, shape, dt):
    """R_s = sum_{i >= s > j} (dA * QK)_ij: X = P U on wgmma (P in two bf16 halves, U the strictly
    upper 0/1 matrix in u_ref), then the masked column sum over i >= s."""
    Pm = dA * QK
    hi = Pm.astype(dt)
    lo = (Pm - hi.astype(f32)).astype(dt)
    X1, X2 = ops.mm(prod(hi, u_ref), prod(lo, u_ref))
    below = ops.iota(shape, 0) >= ops.iota(shape, 1)
    return jnp.sum(jnp.where(below, X1 + X2, 0.0), axis=0)


def _produce_chunks(ops, refs, rings, bars, *, pid, progs, count, H, N, C, NKB, stages, SS,
                    heads_fastest):
    """The producer warpgroup of the per-chunk gradient kernel ("split"): item i's q, k,
    v, do and gate rows into slot i % stages of the chunk ring, then its NKB (S_n, dS_n+1) key
    tiles one after another into the key-tile ring of SS slots, each slot reloaded once its
    consumers released it (`used_bar`, `tused_bar`); at the end every last release is observed."""
    q_ref, k_ref, v_ref, do_ref, g_ref, s_ref, ds_ref = refs
    qs, ks, vs, dos, gs, ss, dss = rings
    in_bar, used_bar, tin_bar, tused_bar = bars
    ops.registers(PRODUCER_REGS, "decrease")

    @pl.loop(0, count)
    def _(i):
        b, h, n = grid_item(pid + i * progs, H, N, heads_fastest=heads_fastest)
        t, slot = pl.ds(n * C, C), lax.rem(i, stages)
        pl.when(i >= stages)(lambda: plgpu.barrier_wait(used_bar.at[slot]))
        bar = in_bar.at[slot]
        for src, dst in ((q_ref, qs), (k_ref, ks), (v_ref, vs), (do_ref, dos)):
            plgpu.copy_gmem_to_smem(src.at[b, t, h], dst.at[slot], bar)
        if g_ref is not None:
            plgpu.copy_gmem_to_smem(g_ref.at[b, h, :, t], gs.at[slot], bar)
        for kb in range(NKB):
            j = i * NKB + kb
            ts, kr = lax.rem(j, SS), pl.ds(kb * LANES, LANES)
            pl.when(j >= SS)(lambda ts=ts: plgpu.barrier_wait(tused_bar.at[ts]))
            plgpu.copy_gmem_to_smem(s_ref.at[b, h, n, kr], ss.at[ts], tin_bar.at[ts])
            plgpu.copy_gmem_to_smem(ds_ref.at[b, h, n, kr], dss.at[ts], tin_bar.at[ts])

    for s in range(stages):                               # observe the last releases too
        pl.when(s < count)(lambda s=s: plgpu.barrier_wait(used_bar.at[s]))
    for s in range(SS):
        pl.when(s < count * NKB)(lambda s=s: plgpu.barrier_wait(tused_bar.at[s]))


def _grad_split(q, k, v, do, rows, states, dstates, *, names, scale, cfg):
    """grad_items "split": one (b, h, chunk) item (q, k, v, do and the intra blocks loaded and
    formed once for all its key tiles) shared by two compute warpgroups, one per side of the
    gradient, so each runs half the dependent wgmma chain and neither waits on the other (one
    warpgroup running both sides took 0.38 ms at the T = 2048 anchor on the H200, against 0.20):

        dq side (wg 0): dP = do v^T, dA; per key tile dq = dA k + diag(gq) do S_n^T; the gate
                        sums Qq_i (rows i >= s) and Qd_n (every row)
        dk side (wg 1): q k^T, dP (again: 1 MFLOP, no exchange), dA; R_s from Y = W P (W_si =
                        [i >= s] in registers, P = dA * q k^T from SMEM as bf16 hi + lo), then
                        per key tile dk = dA^T q + diag(gk) v dS_n+1^T; the gate sums Qk_j
                        (rows j < s)

    A slot of either ring (`_produce_chunks`) is released when both sides arrived. No sum runs over
    axis 0 of a tile (that is a cross-warp reduction through the CTA's one reduction scratch,
    which two warpgroups would race on): the sums over the chunk's rows reach the column layout
    through each side's own SMEM row and are then summed along axis 1. Each side writes its own
    half of the gate gradient, dg [B, H, 2, Tp], added in XLA."""
    B, Tp, H, K, V, N, items, progs, has_rows, gated = _setup(q, v, rows, names, cfg, True)
    C, dt, NKB = cfg.chunk, q.dtype, K // LANES
    stages, SS = cfg.stages_grad, 2                       # chunk ring, key-tile ring
    ops = Ops(interpreting(cfg), overlap=cfg.overlap)
    hf = cfg.item_order == "heads"
    raw = cfg.gates == "kernel"

    def body(*refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None       # noqa: E731
        q_ref, k_ref, v_ref, do_ref, g_ref, s_ref, ds_ref = (pop(), pop(), pop(), pop(),
                                                             pop(has_rows), pop(), pop())
        dq_ref, dk_ref, dg_ref = pop(), pop(), pop(gated)
        qs, ks, vs, dos, gs, ss, dss = pop(), pop(), pop(), pop(), pop(has_rows), pop(), pop()
        oq_s, da_s, dk_s, dgs, tmp = pop(), pop(), pop(), pop(gated), pop()
        in_bar, used_bar, tin_bar, tused_bar = refs
        pid, w, count = program_items(items, progs)

        pl.when(w == 2)(lambda: _produce_chunks(
            ops, (q_ref, k_ref, v_ref, do_ref, g_ref, s_ref, ds_ref),
            (qs, ks, vs, dos, gs, ss, dss), (in_bar, used_bar, tin_bar, tused_bar),
            pid=pid, progs=progs, count=count, H=H, N=N, C=C, NKB=NKB, stages=stages, SS=SS,
            heads_fastest=hf))

        shape, half = (C, C), (C, LANES)

        def to_cols(vec, row):
            """A row vector as one over the columns, through this side's SMEM row `row`."""
            tmp[row] = vec
            plgpu.commit_smem()
            return ops.cols_of(ops.col(tmp[row]), shape)

        def side(dq_side: bool):
            ops.registers(CONSUMER_REGS, "increase")
            base = 0 if dq_side else 3                    # this side's rows of tmp
            r, c = ops.iota(shape, 0), ops.iota(shape, 1)

            @pl.loop(0, count)
            def _(i):
                slot = lax.rem(i, stages)
                b, h, n = grid_item(pid + i * progs, H, N, heads_fastest=hf)
                t = pl.ds(n * C, C)
                qq, kk, vv, dd = qs.at[slot], ks.at[slot], vs.at[slot], dos.at[slot]

                def factors():
                    gt = ChunkGates(ops, gs.at[slot] if has_rows else None, names, C,
                                    scale=scale, raw=raw, tmp=tmp.at[base])
                    vals = {"E": gt.E(reverse=False)}
                    if has_rows:
                        vals.update(gq=gt.gq, gk=gt.gk, dec=gt.dec)
                    return vals

                plgpu.barrier_wait(in_bar.at[slot])
                if dq_side:
                    (dP,), f = ops.mm(prod(dd, vv, tb=True), during=factors)
                else:
                    (QK, dP), f = ops.mm(prod(qq, kk, tb=True), prod(dd, vv, tb=True),
                                         during=factors)
                dA = dP * f["E"]
                dA16 = dA.astype(dt)
                out_s = oq_s if dq_side else dk_s
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last item's stores are out
                if not dq_side:
                    if gated:                             # R_s = sum_{j < s} (W P)_sj
                        # W (W_si = [i >= s]) from SMEM, not registers: an iota-made 0/1
                        # matrix as a register wgmma operand is wrong on the H200 (rows 8-15 of
                        # each warp's 16; session 10). P as bf16 hi, then lo, through dk_s.
                        Pm = dA * QK
                        hi = Pm.astype(dt)
                        da_s[...] = (c >= r).astype(dt)
                        dk_s[...] = hi
                        plgpu.commit_smem()
                        Y = ops.dot(da_s, dk_s)
                        dk_s[...] = (Pm - hi.astype(f32)).astype(dt)
                        plgpu.commit_smem()
                        Y = ops.dot(da_s, dk_s, Y)
                        R = jnp.sum(jnp.where(c < r, Y, 0.0), axis=1)
                    da_s[...] = dA16
                    plgpu.commit_smem()
                if gated:
                    Qx = Qd = ops.row(jnp.zeros((C,), f32))
                for kb in range(NKB):
                    kr, ts = pl.ds(kb * LANES, LANES), lax.rem(i * NKB + kb, SS)
                    plgpu.barrier_wait(tin_bar.at[ts])
                    if dq_side:
                        intra, inter = ops.mm(prod(dA16, kk.at[:, kr]),
                                              prod(dd, ss.at[ts], tb=True))
                        inter = inter * (ops.rows_of(f["gq"], half) if has_rows else scale)
                    else:
                        intra, inter = ops.mm(prod(da_s, qq.at[:, kr], ta=True),
                                              prod(vv, dss.at[ts], tb=True))
                        if has_rows:
                            inter = inter * ops.rows_of(f["gk"], half)
                    if gated:
                        x = (qq if dq_side else kk).at[:, kr]
                        Qx = Qx + jnp.sum(ops.acc(x[...]).astype(f32) * inter, axis=1)
                        if dq_side:
                            Sn = ops.acc(ss.at[ts][...]).astype(f32)
                            Qd = Qd + f["dec"] * jnp.sum(
                                Sn * ops.acc(dss.at[ts][...]).astype(f32), axis=1)
                    plgpu.barrier_arrive(tused_bar.at[ts])   # this side read the key tiles
                    if kb:
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_s[...] = (intra + inter).astype(dt)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_s, (dq_ref if dq_side else dk_ref).at[b, t, h, kr])
                plgpu.barrier_arrive(used_bar.at[slot])   # this side read the chunk slot
                if gated:
                    # dq side: sum_{i >= s} Qq_i + Qd_n; dk side: sum_{j < s} Qk_j + R_s
                    Qc = to_cols(Qx, base + 1)
                    if dq_side:
                        part = jnp.sum(jnp.where(c >= r, Qc, 0.0) + to_cols(Qd, base + 2),
                                       axis=1)
                    else:
                        part = jnp.sum(jnp.where(c < r, Qc, 0.0), axis=1) + R
                    row = 0 if dq_side else 1
                    dgs[row] = part
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(dgs.at[pl.ds(row, 1)],
                                            dg_ref.at[b, h, pl.ds(row, 1), t])

            plgpu.wait_smem_to_gmem(0)

        pl.when(w == 0)(lambda: side(True))
        pl.when(w == 1)(lambda: side(False))

    scratch = [smem((stages, C, K), dt), smem((stages, C, K), dt), smem((stages, C, V), dt),
               smem((stages, C, V), dt)]
    if has_rows:
        scratch.append(plgpu.SMEM((stages, rows.shape[2], C), f32))
    scratch += [smem((SS, LANES, V), dt), smem((SS, LANES, V), dt),
                smem((C, LANES), dt), smem((C, C), dt), smem((C, C), dt)]
    scratch += [plgpu.SMEM((2, C), f32)] if gated else []                # dg, one row a side
    scratch += [plgpu.SMEM((6, C), f32)]                                 # to_cols / ChunkGates
    scratch += [plgpu.Barrier(num_arrivals=4 + has_rows, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=SS),
                plgpu.Barrier(num_arrivals=2, num_barriers=SS)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, K), dt)]
    out_type += [jax.ShapeDtypeStruct((B, H, 2, Tp), f32)] if gated else []
    check_smem("simple_gla grad (split)", scratch)
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(progs,), grid_names=("p",),
                    scratch=scratch, name="simple_gla_grad_split", num_threads=3)
    args = (q, k, v, do) + ((rows,) if has_rows else ()) + (states, dstates)
    outs = kernel(*args)
    return outs[0], outs[1], (outs[2] if gated else None)


def _grad_tiles(q, k, v, do, rows, states, dstates, *, names, scale, cfg):
    B, Tp, H, K, V, N, items, progs, has_rows, gated = _setup(q, v, rows, names, cfg, False)
    C, dt, NKB = cfg.chunk, q.dtype, K // LANES
    stages = cfg.stages_grad
    ops = Ops(interpreting(cfg), overlap=cfg.overlap)
    hf = cfg.item_order == "heads"
    raw = cfg.gates == "kernel"

    def body(*refs):
        q_ref, k_ref, v_ref, do_ref, *refs = refs
        g_ref = refs.pop(0) if has_rows else None
        s_ref, ds_ref, dq_ref, dk_ref, stats_ref, *refs = refs
        qs, ks, vs, dos, ss, dss, *refs = refs
        gs = refs.pop(0) if has_rows else None
        da_s, oq_s, u_s, sts, *refs = refs
        tmp = refs.pop(0) if raw and gated else None
        in_bar, used_bar = refs
        pid, w, count = program_items(items, progs)

        def issue(i, slot):
            b, h, n, kb, t, kr = key_tile_item(pid + i * progs, H, N, NKB, C, heads_fastest=hf)
            bar = in_bar.at[slot]
            for src, dst in ((q_ref, qs), (k_ref, ks), (v_ref, vs), (do_ref, dos)):
                plgpu.copy_gmem_to_smem(src.at[b, t, h], dst.at[slot], bar)
            load(bar, slot, (s_ref.at[b, h, n, kr], ss), (ds_ref.at[b, h, n, kr], dss))
            if has_rows:
                plgpu.copy_gmem_to_smem(g_ref.at[b, h, :, t], gs.at[slot], bar)

        ops.producer(w == 1, issue, count, stages, used_bar)

        @pl.when(w == 0)
        def _consumer():
            ops.registers(CONSUMER_REGS, "increase")
            shape, half = (C, C), (C, LANES)
            if gated:                                     # U_js = [j < s], exact in bf16
                u_s[...] = (ops.iota(shape, 0) < ops.iota(shape, 1)).astype(dt)
                plgpu.commit_smem()

            @pl.loop(0, count)
            def _(i):
                slot = lax.rem(i, stages)
                b, h, n, kb, t, kr = key_tile_item(pid + i * progs, H, N, NKB, C, heads_fastest=hf)
                qq, kk, vv, dd = qs.at[slot], ks.at[slot], vs.at[slot], dos.at[slot]
                plgpu.barrier_wait(in_bar.at[slot])
                QK, dP = ops.mm(prod(qq, kk, tb=True), prod(dd, vv, tb=True))
                gt = ChunkGates(ops, gs.at[slot] if has_rows else None, names, C, scale=scale,
                                raw=raw, tmp=None if tmp is None else tmp.at[0])
                dA = dP * gt.E(reverse=False)
                if gated:
                    R = _intra_gate_term(ops, dA, QK, u_s, shape, dt)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last item's stores are out
                da_s[...] = dA.astype(dt)
                plgpu.commit_smem()
                dq, dk, dqi, dki = ops.mm(prod(dA.astype(dt), kk.at[:, kr]),
                                          prod(da_s, qq.at[:, kr], ta=True),
                                          prod(dd, ss.at[slot], tb=True),
                                          prod(vv, dss.at[slot], tb=True))
                if has_rows:
                    dqi = dqi * ops.rows_of(gt.gq, half)
                    dki = dki * ops.rows_of(gt.gk, half)
                    dec = gt.dec
                else:
                    dqi, dec = dqi * scale, 1.0
                Qq = jnp.sum(ops.acc(qq.at[:, kr][...]).astype(f32) * dqi, axis=1)
                Qk = jnp.sum(ops.acc(kk.at[:, kr][...]).astype(f32) * dki, axis=1)
                Sn = ops.acc(ss.at[slot][...]).astype(f32)
                Qd = dec * jnp.sum(Sn * ops.acc(dss.at[slot][...]).astype(f32), axis=1)
                plgpu.barrier_arrive(used_bar.at[slot])   # every read of this slot is complete
                oq_s[...] = (dq + dqi).astype(dt)
                da_s[...] = (dk + dki).astype(dt)         # the dk wgmma has read dA: reuse
                sts[0] = Qq
                sts[1] = Qk
                sts[2] = R if gated else ops.row(jnp.zeros((C,), f32))
                sts[3] = Qd
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(oq_s, dq_ref.at[b, t, h, kr])
                plgpu.copy_smem_to_gmem(da_s, dk_ref.at[b, t, h, kr])
                plgpu.copy_smem_to_gmem(sts, stats_ref.at[kb, b, h, :, t])

            plgpu.wait_smem_to_gmem(0)

    scratch = [smem((stages, C, K), dt), smem((stages, C, K), dt), smem((stages, C, V), dt),
               smem((stages, C, V), dt), smem((stages, LANES, V), dt),
               smem((stages, LANES, V), dt)]
    if has_rows:
        scratch.append(plgpu.SMEM((stages, rows.shape[2], C), f32))
    scratch += [smem((C, C), dt), smem((C, LANES), dt), smem((C, C), dt),
                plgpu.SMEM((4, C), f32)]
    scratch += [plgpu.SMEM((1, C), f32)] if raw and gated else []      # ChunkGates' tmp
    scratch += [plgpu.Barrier(num_arrivals=6 + has_rows, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, K), dt),
                jax.ShapeDtypeStruct((NKB, B, H, 4, Tp), f32)]
    check_smem("simple_gla grad", scratch)
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(progs,), grid_names=("p",),
                    scratch=scratch, name="simple_gla_grad_tiles", num_threads=2)
    args = (q, k, v, do) + ((rows,) if has_rows else ()) + (states, dstates)
    dq, dk, stats = kernel(*args)
    return dq, dk, (stats if gated else None)


def gate_grad_tiles(stats, C):
    """dg [B, Tp, H] from the "tile" kernel's per-chunk terms (see `decay`'s docstring)."""
    NKB, B, H, _, Tp = stats.shape
    x = stats.reshape(NKB, B, H, 4, Tp // C, C)
    Qq, Qk = x[:, :, :, 0].sum(0), x[:, :, :, 1].sum(0)
    R, Qd = x[0, :, :, 2], x[:, :, :, 3].sum((0, -1))
    after_q = jnp.flip(jnp.cumsum(jnp.flip(Qq, -1), -1), -1)       # sum_{i >= s}
    before_k = jnp.cumsum(Qk, -1)
    before_k = jnp.concatenate([jnp.zeros_like(before_k[..., :1]), before_k[..., :-1]], -1)
    dg = after_q + before_k + Qd[..., None] + R                     # [B, H, N, C]
    return jnp.moveaxis(dg.reshape(B, H, Tp), 1, 2)
