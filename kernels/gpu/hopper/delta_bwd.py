"""Backward kernels of the delta rule and Gated DeltaNet on Hopper (Mosaic GPU); the forward, the
notation and the custom_vjp are in `delta.py` (-W is stored, so u = U + (-W) S_n).

The gradient, per chunk, given do and dS_n+1:

    du     = (q k^T * E)^T do + diag(gk) k dS_n+1
    dS_n   = dec dS_n+1 + q^T diag(gq) do + (-W)^T du
    dB_v   = T^T du                          (B_v = diag(beta) V, U = T B_v)
    dB_k   = T^T dW = -dB_v S_n^T            (B_k = diag(beta ein) K, W = T B_k, dW = -du S_n^T)
    dL     = -T^T (du B_v^T + dW B_k^T) T^T = -dB_v u^T    (strictly lower, same document)

The last line is why no T, U or W reaches the gradient kernel: B_v - B_k S_n = (I + L) u, so
dT T^T-products collapse to dB_v u^T. Then

    dv     = diag(beta) dB_v
    dq     = (do u^T * E) k + diag(gq) do S_n^T
    dk     = (do u^T * E)^T q + diag(gk) u dS_n+1^T - diag(beta ein) dB_v S_n^T + (dKK + dKK^T) k
    dKK    = dL * Gamma * beta (rows)
    dbeta  = rowsum(dB_v * v) - ein rowsum(k * dB_v S_n^T) + rowsum(dL * K K^T * Gamma)

and each gate term is routed to the gates of its span (g_s enters exp(G_i - G_j) for j < s <= i,
exp(G_i) for s <= i, exp(G_last - G_j) for s > j, exp(G_last) for all s), so no gate gradient is
a difference of two large sums and the diagonal pairs never touch dg (exact at strong decay):

    dg_s = sum_{i>=s} (Qq_i + Qi_i) + sum_{j<s} Qk_j + Qd + sum_{i>=s>j} (dA*A + dL*L)_ij
    Qq_i = gq_i q_i . (do S_n^T)_i,  Qi_i = -beta_i ein_i k_i . (dB_v S_n^T)_i,
    Qk_j = gk_j k_j . (u dS_n+1^T)_j,  Qd = dec <S_n, dS_n+1>

Stages.
  `walk_rev`  one CTA per (b, h), chunks from the last: dS carried on chip as simple_gla's reverse
              walk; per chunk a consumer issues k q^T and k dS_n+1 together, forms du, stores du and
              gq do to SMEM, then issues T^T du and the dS update (q^T (gq do) + (-W)^T du onto
              dec dS) together. Writes dB_v and every dS_n+1 (bf16); dS_0 as bf16 hi + lo.
  `grad`      chunk-parallel, a persistent grid over (b, h, chunk, 64-key tile), each item shared
              by two compute warpgroups, a dq side and a dk side: dq, dk of the tile and the
              per-row gate and beta terms (the K-contracted pair products q k^T, k k^T enter dbeta
              and dg linearly, so each tile adds its part; XLA sums the tiles and takes the prefix
              sums over the chunk).
  XLA         dv = beta dB_v, rowsum(dB_v * v) (one fused elementwise pass), dg's prefix sums.

Tiles and warpgroups.
  walk_rev: grid (B, H); V/64 consumers each owning dS[:, 64 columns] (float32 registers), one
        producer streaming q, k, do, -W [64, K|V] bf16, T [64, 64] bf16 and the rows into 2 slots
        (74 KB each at K = V = 128); per consumer the bf16 dS tile and two [64, 64] tiles (du; gq
        do, then dB_v for its TMA store): 212 KB.
  grad: grid (#SMs,); a dq side (wg 0) and a dk side (wg 1), one producer (wg 2; 2 x 232 + 40
        registers a thread), as simple_gla's split gradient. The producer streams 2 slots of q, k
        [64, 64], do, u, dB_v [64, V], S_n, dS_n+1 [64 keys, V] and the rows (97.75 KB each at
        K = V = 128); a slot is released when both sides arrived (a used barrier of two
        arrivals). The sides exchange nothing: the cheap pair products are formed on both. On
        the H200 (gated_delta_rule, T = 2048, B = 8, H = 16, K = V = 128) the kernel took 0.451
        ms against 0.775 ms for one compute warpgroup running the whole item (four dependent
        wgmma groups, 18 [64, 64, 64] units; that program was removed), with dq, dk, dbeta, dg
        the same to 1e-5.
    dq side  group 1: dA = do u^T, dB_v u^T, k k^T (and q k^T when gated); dA * E, dL * Gamma
             and dbeta's pair part rowsum(dL * Gamma * K K^T). Group 2: dq = (dA * E) k
             (register A operand) + diag(gq) do S_n^T, and when gated Y = W P_hi, W_si = [i >= s]
             (an SMEM constant of the CTA, written once) and P = dA*E * q k^T + dKK * K K^T as
             bf16 hi through the side's [64, 64] tile. Group 3 (gated): Y += W P_lo through the
             same tile; R_s = sum_{j<s} Y_sj (a sum over axis 1), Qq, Qd. dq leaves through that
             tile.
    dk side  group 1: the pair blocks transposed (rows keys j): dA^T = u do^T, dB_v u^T,
             u dB_v^T; (dA * E)^T (E^T from the reverse pairs) and dKK + dKK^T = -(dB_v u^T *
             Gamma * beta_j + u dB_v^T * Gamma^T * beta_i) (beta_i: the rows' SMEM row read in
             the column layout), both in registers. Group 2: dk = (dA * E)^T q + (dKK + dKK^T) k
             (register A operands: no SMEM tile, no transposed operand), u dS_n+1^T, dB_v S_n^T;
             then dk's row terms, Qi, Qk and dbeta's state part. dk leaves through its own tile.
    Work in [64, 64, 64] wgmma units at K = V = 128: dq side 11, dk side 12 (dA twice and
        dB_v u^T twice); 3 dependent groups (gated; 2 without a gate).
    Stats [K/64, B, H, 7, Tp] (STATS): the dq side's rows Qq, R, Qd, dbeta's pair part, the dk
        side's Qi, Qk, dbeta's state part, each side storing its rows by TMA from its own rows of
        one float32 [7, 64] SMEM tile; `gate_terms` adds Qq + Qi and the dbeta parts.
    SMEM at K = V = 128 with gates and documents (7 rows): 2 slots of 97.75 KB + the dq side's
        P / dq tile and W (16 KB) + the dk side's tile (8 KB) + the stats tile (1.75 KB):
        221.25 KB of the 225 KB a CTA may have (without a gate, no W: 212.75 KB at 6 rows). A
        fourth [64, 64] tile does not fit (229.25 KB): hence P's hi and lo pass through one
        tile, one after the other (the dq side's group 3).
    Device rules kept: no sum over axis 0 of a tile (R is a sum over axis 1 of Y = W P, so no
        row vector needs the column layout); the iota-made W is an SMEM operand only; the
        register A operands are data (dA * E, its transpose, dKK + dKK^T) rounded to bf16.

Roofline at the anchor shapes (bf16, H = 16, K = V = 128, B T = 16384; 4096 chunk-heads):
  walk_rev  reads q, k, do, -W (268 MB), T (34 MB); writes dB_v (67 MB), dS_n+1 (134 MB):
            503 MB, 0.12 ms; latency-bound like the forward walk (~3 us per chunk).
  grad      reads per key tile q, k (half each), do, u, dB_v, S_n and dS_n+1 tiles: 2 x 98 KB per
            chunk-head = 800 MB; writes dq, dk (134 MB): 0.22 ms; 23 [64,64,64] wgmmas per item
            (8192 items): 99 GFLOP, 0.13 ms. Measured: 0.451 ms (above).
  XLA       dv and rowsum(dB_v v): ~200 MB, 0.05 ms.
  fwd+bwd   forward with residuals (~0.2 ms) + ~0.4 ms: ~0.6 ms at T = 2048 against
            jax-linear-attention's 0.922 / 0.833 ms (deltanet / gated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.configs import multiprocessors
from linear_jax.kernels.gpu.hopper.common import (
    CONSUMER_REGS,
    LANES,
    Ops,
    check_smem,
    f32,
    interpreting,
    key_tile_item,
    launch,
    launch_walk,
    load,
    mm_sum,
    pl,
    plgpu,
    program_items,
    smem,
    split_hi_lo_xla,
    term,
    walk_setup,
)
from linear_jax.kernels.gpu.hopper.delta import (
    end_step,
    load_state,
    map_starts,
    pairs,
    row_vec,
    scan_pieces,
    store_state,
    walk_cell,
    walk_columns,
)

# the gradient kernel's stats rows: the dq side's (0-3), then the dk side's (4-6); dbeta = dbp + dbs
STATS = ("Qq", "R", "Qd", "dbp", "Qi", "Qk", "dbs")
DQ_ROWS = 4


def walk_rev(q, k, do, wm, tm, A, rows, dS, *, names, scale, cfg, pieces=1, emit="out"):
    """The reverse walk over the chunks of each (b, h), or of each of its `pieces` P pieces of
    N/P chunks, every piece from its own entering cotangent.

    q, k, wm (-W) [B, Tp, H, K]; do [B, Tp, H, V]; tm (T) and A (the masked scores of
    `delta.prep`) [B, H, N, C, C]; rows `delta.delta_rows`; dS the pieces' entering cotangents
    (of their last chunk's end state) as (hi, lo) [B, H, P, K, X].
    emit "out": X = V. Returns dB_v [B, Tp, H, V], each piece's dS at its first chunk as (hi, lo)
      [B, H, P, K, V] (piece 0's is dS_0) and every dS_n+1 [B, H, N, K, V] (q's dtype).
    emit "state": the state pass of the two-level reverse walk (`two_level_rev`): X = K + V, the
      first K columns reading do as 0, so that from [I | dS] a piece ends at its affine map
      [M | M dS + E]; returns only those (hi, lo) [B, H, P, K, K + V].

    The value blocks of 64 run as the consumers of one CTA per (b, h, piece) or, where
    `HopperDeltaConfig.split_walk` says so (and always in the state pass), in a CTA each; split,
    a CTA has the SMEM to read A^T (the forward's A, read transposed) instead of forming k q^T,
    its masks and exponentials on its chain (joint at K = V = 128 it would take 227 KB)."""
    out, P = emit == "out", pieces
    B, Tp, H, K, V, C, dt, N, NW, NKB, L, stages = walk_setup(q, do, cfg, P)
    X, NB, split, NC, DV = walk_columns(cfg, out, B, H, P, K, V)
    ops = Ops(interpreting(cfg))
    blk = (C, LANES)

    def body(q_ref, k_ref, do_ref, w_ref, t_ref, a_ref, g_ref, dh_ref, dl_ref, *refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None       # noqa: E731
        dbv_ref, sh_ref, sl_ref, ds_ref = pop(out), pop(), pop(), pop(out)
        xs, ys, zs, ws, ts, as_, gs = pop(), pop(), pop(), pop(), pop(), pop(split), pop()
        st, dut, qt, in_bar, used_bar, own_bar = refs
        b, h, w = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
        p, cb, dc, dcoef = walk_cell(split, out, NB, NKB, V)
        chunk = lambda step: p * L + L - 1 - step       # noqa: E731

        def issue(step, slot):
            n = chunk(step)
            t = pl.ds(n * C, C)
            bar = in_bar.at[slot]
            load(bar, slot,
                 (q_ref.at[b, t, h], xs),
                 (k_ref.at[b, t, h], ys),
                 (do_ref.at[b, t, h, dc], zs),
                 (w_ref.at[b, t, h], ws),
                 (t_ref.at[b, h, n], ts),
                 (g_ref.at[b, h, :, t], gs))
            if split:
                plgpu.copy_gmem_to_smem(a_ref.at[b, h, n], as_.at[slot], bar)

        @ops.walk_warpgroups(w, NC, (issue, L, stages, used_bar), cb, NKB)
        def _consumer(vc, kblk):
            vl = pl.ds(0 if split else w * LANES, LANES)
            sw, dw, qw = st.at[w], dut.at[w], qt.at[w]
            view = lambda r: r.at[b, h, p, :, vc]          # noqa: E731
            dS0 = load_state(ops, (dh_ref, dl_ref), view, sw, own_bar.at[w], kblk)

            def step_fn(step, dS):
                n, slot = chunk(step), lax.rem(step, stages)
                t = pl.ds(n * C, C)
                xq, yk, dd, wmm, tt, g = (xs.at[slot], ys.at[slot], zs.at[slot], ws.at[slot],
                                          ts.at[slot], gs.at[slot])
                with jax.named_scope("wait"):
                    plgpu.barrier_wait(in_bar.at[slot])
                if out:
                    plgpu.copy_smem_to_gmem(sw, ds_ref.at[b, h, n, :, vc])    # dS_n+1
                with jax.named_scope("mm1"):              # du = A^T do + gk k dS
                    gk = row_vec(ops, g, names, "gk", blk)
                    if split:                             # A from the prep
                        (du,) = mm_sum(ops, (None, [term(yk, sw)]))
                        du = du * gk
                        if out:
                            du = ops.dot(as_.at[slot], dd.at[:, vl], acc=du, ta=True)
                        else:
                            du = du + dcoef * ops.dot(as_.at[slot], dd.at[:, vl], ta=True)
                    else:
                        At, kdS = mm_sum(ops, (None, [term(yk, xq, tb=True)]),
                                         (None, [term(yk, sw)]))
                        mask, decay = pairs(ops, g, names, C, reverse=True, strict=False)
                        At = jnp.where(mask, At * scale if decay is None else
                                       At * (scale * decay), 0.0)
                        du = ops.dot(At.astype(dt), dd.at[:, vl], acc=kdS * gk)
                with jax.named_scope("store_du"):
                    gdo = ops.acc(dd.at[:, vl][...]).astype(f32) * row_vec(ops, g, names, "gq",
                                                                           blk)
                    if not out:
                        gdo = gdo * dcoef
                    dec = g[names.index("dec"), 0]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last dB_v, dS_n+1
                    dw[...] = du.astype(dt)
                    qw[...] = gdo.astype(dt)
                    plgpu.commit_smem()
                with jax.named_scope("mm2"):
                    upd = [(dS[i] * dec, [term(xq.at[:, kr], qw, ta=True),
                                          term(wmm.at[:, kr], dw, ta=True)])
                           for i, kr in enumerate(kblk)]
                    if out:
                        dbv, *dS = mm_sum(ops, (None, [term(tt, dw, ta=True)]), *upd)
                    else:
                        dS = mm_sum(ops, *upd)
                # dB_v leaves through qw, which the dS update has read
                return end_step(dS, sw, kblk, used_bar.at[slot], "store",
                                (dbv, qw, dbv_ref.at[b, t, h, vc]) if out else None)

            dS = lax.fori_loop(0, L, step_fn, tuple(dS0))
            store_state(dS, (sh_ref, sl_ref), view, sw, kblk, dt)

    end = jax.ShapeDtypeStruct((B, H, P, K, X), dt)
    out_type = [end, end]
    if out:
        out_type = [jax.ShapeDtypeStruct((B, Tp, H, V), dt)] + out_type + [
            jax.ShapeDtypeStruct((B, H, N, K, V), dt)]
    scratch = [smem((stages, C, K), dt), smem((stages, C, K), dt), smem((stages, C, DV), dt),
               smem((stages, C, K), dt), smem((stages, C, C), dt)]
    scratch += [smem((stages, C, C), dt)] if split else []
    scratch += [plgpu.SMEM((stages, rows.shape[2], C), f32),
                smem((NC, K, LANES), dt), smem((NC, C, LANES), dt), smem((NC, C, LANES), dt)]
    check_smem("delta reverse walk", scratch)
    kernel = launch_walk(body, cfg, ops, out_type=out_type, scratch=scratch, cells=(B, H, P, NB),
                         consumers=NC, copies=6 + split, stages=stages, name="delta_walk",
                         reverse=True, out=out, split=split)
    return kernel(q, k, do, wm, tm, A, rows, *dS)


def two_level_rev(q, k, do, wm, tm, A, rows, dS, *, names, scale, cfg, pieces):
    """The reverse walk cut into `pieces` P pieces walked in parallel (as `delta.two_level`,
    backwards): the state pass gives each piece's affine map (the last piece's E columns start
    from the final state's cotangent dS, float32 [B, H, K, V]), a float32 scan from the last piece
    down gives their entering cotangents, and the output pass walks every piece from its own.
    Returns what `walk_rev` (emit "out") does. P = 1: the single-level reverse walk."""
    dt = q.dtype
    if pieces == 1:
        return walk_rev(q, k, do, wm, tm, A, rows, split_hi_lo_xla(dS[:, :, None], dt),
                        names=names, scale=scale, cfg=cfg)
    ends = walk_rev(q, k, do, wm, tm, A, rows, map_starts(dS, pieces, pieces - 1, dt),
                    names=names, scale=scale, cfg=cfg, pieces=pieces, emit="state")
    starts = scan_pieces(ends, dS, reverse=True)
    return walk_rev(q, k, do, wm, tm, A, rows, split_hi_lo_xla(starts, dt), names=names,
                    scale=scale, cfg=cfg, pieces=pieces)


def _issue_item(item, refs, rings, bar, slot):
    """The TMA loads of one gradient item (b, h, n, kb, rows t, key block kr) into ring `slot`."""
    b, h, n, kb, t, kr = item
    q_ref, k_ref, do_ref, u_ref, bv_ref, g_ref, s_ref, ds_ref = refs
    qs, ks, dos, us, bvs, gs, ss, dss = rings
    load(bar, slot, (q_ref.at[b, t, h, kr], qs), (k_ref.at[b, t, h, kr], ks))
    for src, dst in ((do_ref, dos), (u_ref, us), (bv_ref, bvs)):
        plgpu.copy_gmem_to_smem(src.at[b, t, h], dst.at[slot], bar)
    load(bar, slot, (g_ref.at[b, h, :, t], gs), (s_ref.at[b, h, n, kr], ss),
         (ds_ref.at[b, h, n, kr], dss))


def grad(q, k, do, u, dbv, rows, states, dstates, *, names, scale, cfg):
    """dq, dk and the per-row gate and beta terms of every chunk, chunk-parallel, each item shared
    by two compute warpgroups (see the module docstring): the dq side (wg 0) and the dk side (wg 1)
    read the same ring slot (released when both arrived) and write their own outputs, staging
    tiles and stats rows.

    q, k [B, Tp, H, K]; do, u, dbv (dB_v) [B, Tp, H, V]; rows `delta.delta_rows`; states /
    dstates [B, H, N, K, V] the S_n and dS_n+1 of each chunk. Returns dq, dk (q's dtype) and
    stats [K/64, B, H, 7, Tp] float32, each key tile's part of the rows of STATS (Qd in each chunk's
    entries, one state row each; dbeta without rowsum(dB_v v)), which `gate_terms` combines.
    """
    B, Tp, H, K = q.shape
    V, C, dt, stages = do.shape[-1], cfg.chunk, q.dtype, cfg.stages_grad
    N, NKB = Tp // C, K // LANES
    items = B * H * N * NKB
    progs = min(cfg.programs or multiprocessors(jax.devices()[0]), items)
    ops, hf, gated = Ops(interpreting(cfg)), cfg.item_order == "heads", "G" in names
    shape = (C, C)
    NS, ND = len(STATS), DQ_ROWS

    def body(q_ref, k_ref, do_ref, u_ref, bv_ref, g_ref, s_ref, ds_ref, dq_ref, dk_ref, stats_ref,
             qs, ks, dos, us, bvs, gs, ss, dss, oq_s, ok_s, *refs):
        refs = list(refs)
        w_s = refs.pop(0) if gated else None
        sts, in_bar, used_bar = refs
        pid, w, count = program_items(items, progs)

        def issue(i, slot):
            _issue_item(key_tile_item(pid + i * progs, H, N, NKB, C, heads_fastest=hf),
                        (q_ref, k_ref, do_ref, u_ref, bv_ref, g_ref, s_ref, ds_ref),
                        (qs, ks, dos, us, bvs, gs, ss, dss), in_bar.at[slot], slot)

        ops.producer(w == 2, issue, count, stages, used_bar)

        def side(dq_side: bool):
            ops.registers(CONSUMER_REGS, "increase")
            r, c = ops.iota(shape, 0), ops.iota(shape, 1)
            if dq_side and gated:      # W_si = [i >= s], in SMEM (not a register operand: rule 2)
                w_s[...] = (c >= r).astype(dt)
                plgpu.commit_smem()
            beta = names.index("beta")

            @pl.loop(0, count)
            def _(i):
                slot = lax.rem(i, stages)
                b, h, n, kb, t, kr = key_tile_item(pid + i * progs, H, N, NKB, C, heads_fastest=hf)
                qq, kk, dd, uu, bv, g = (qs.at[slot], ks.at[slot], dos.at[slot], us.at[slot],
                                         bvs.at[slot], gs.at[slot])
                sn, dsn = ss.at[slot], dss.at[slot]
                zero = ops.row(jnp.zeros((C,), f32))
                plgpu.barrier_wait(in_bar.at[slot])
                mask, decay = pairs(ops, g, names, C, reverse=False, strict=False)
                gam = jnp.where(mask & (r > c), 1.0 if decay is None else decay, 0.0)
                if dq_side:
                    dA, dBu, KK, *QK = mm_sum(
                        ops, (None, [term(dd, uu, tb=True)]), (None, [term(bv, uu, tb=True)]),
                        (None, [term(kk, kk, tb=True)]),
                        *([(None, [term(qq, kk, tb=True)])] if gated else []))
                    dAE = dA * jnp.where(mask, scale if decay is None else scale * decay, 0.0)
                    dAEh = dAE.astype(dt)
                    dLg = -dBu * gam                      # dL * Gamma on the strict pairs
                    dbp = jnp.sum(dLg * KK, axis=1)
                    gq = row_vec(ops, g, names, "gq", shape)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last item's dq, stats
                    if gated:                             # R_s = sum_{j < s} (W P)_sj
                        P = dAE * QK[0] + dLg * row_vec(ops, g, names, "beta", shape) * KK
                        hi = P.astype(dt)
                        oq_s[...] = hi
                        plgpu.commit_smem()
                        dq, dqs, Y = mm_sum(ops, (None, [term(dAEh, kk)]),
                                            (None, [term(dd, sn, tb=True)]),
                                            (None, [term(w_s, oq_s)]))
                        oq_s[...] = (P - hi.astype(f32)).astype(dt)   # the wgmmas read hi
                        plgpu.commit_smem()
                        (Y,) = mm_sum(ops, (Y, [term(w_s, oq_s)]))
                        Rg = jnp.sum(jnp.where(c < r, Y, 0.0), axis=1)
                    else:
                        dq, dqs = mm_sum(ops, (None, [term(dAEh, kk)]),
                                         (None, [term(dd, sn, tb=True)]))
                    dqs = gq * dqs
                    dq = dq + dqs
                    if gated:
                        Qq = jnp.sum(ops.acc(qq[...]).astype(f32) * dqs, axis=1)
                        Qd = None
                        for vb in range(V // LANES):       # <S_n, dS_n+1>, 64 columns at a time
                            cols = pl.ds(vb * LANES, LANES)
                            x = jnp.sum(ops.acc(sn.at[:, cols][...]).astype(f32) *
                                        ops.acc(dsn.at[:, cols][...]).astype(f32), axis=1)
                            Qd = x if Qd is None else Qd + x
                        Qd = Qd * g[names.index("dec"), 0]
                    plgpu.barrier_arrive(used_bar.at[slot])   # this side read the slot
                    oq_s[...] = dq.astype(dt)                 # the wgmmas have read lo
                    for j, x in enumerate((Qq, Rg, Qd) if gated else (zero,) * 3):
                        sts[j] = x
                    sts[3] = dbp
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(oq_s, dq_ref.at[b, t, h, kr])
                    plgpu.copy_smem_to_gmem(sts.at[pl.ds(0, ND)],
                                            stats_ref.at[kb, b, h, pl.ds(0, ND), t])
                else:
                    # transposed pair blocks (rows keys j): dk's A operands stay in registers
                    dAT, dBu, dBuT = mm_sum(
                        ops, (None, [term(uu, dd, tb=True)]), (None, [term(bv, uu, tb=True)]),
                        (None, [term(uu, bv, tb=True)]))
                    maskT, decT = pairs(ops, g, names, C, reverse=True, strict=False)
                    dAET = dAT * jnp.where(maskT, scale if decT is None else scale * decT, 0.0)
                    gamT = jnp.where(maskT & (c > r), 1.0 if decT is None else decT, 0.0)
                    bcol = ops.cols_of(ops.col(g.at[beta][...]), shape)
                    M = -(dBu * gam * row_vec(ops, g, names, "beta", shape)
                          + dBuT * gamT * bcol)           # dKK + dKK^T
                    dk, dko, dbk = mm_sum(
                        ops, (None, [term(dAET.astype(dt), qq), term(M.astype(dt), kk)]),
                        (None, [term(uu, dsn, tb=True)]), (None, [term(bv, sn, tb=True)]))
                    kf = ops.acc(kk[...]).astype(f32)
                    gk = row_vec(ops, g, names, "gk", shape)
                    ein = ops.row(g.at[names.index("ein")][...])
                    be = row_vec(ops, g, names, "beta", shape) * ops.rows_of(ein, shape)
                    dk = dk + gk * dko - be * dbk
                    dbs = -ein * jnp.sum(kf * dbk, axis=1)
                    if gated:
                        Qi = -jnp.sum(kf * be * dbk, axis=1)
                        Qk = jnp.sum(kf * gk * dko, axis=1)
                    plgpu.barrier_arrive(used_bar.at[slot])   # this side read the slot
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last item's dk, stats
                    ok_s[...] = dk.astype(dt)
                    sts[ND] = Qi if gated else zero
                    sts[ND + 1] = Qk if gated else zero
                    sts[ND + 2] = dbs
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(ok_s, dk_ref.at[b, t, h, kr])
                    plgpu.copy_smem_to_gmem(sts.at[pl.ds(ND, NS - ND)],
                                            stats_ref.at[kb, b, h, pl.ds(ND, NS - ND), t])

            plgpu.wait_smem_to_gmem(0)

        pl.when(w == 0)(lambda: side(True))
        pl.when(w == 1)(lambda: side(False))

    # the ring (q, k key blocks, do, u, dB_v, the rows, the S_n / dS_n+1 key tiles), the sides'
    # [C, C] tiles (and W when gated), the stats rows, a slot barrier released by both sides
    scratch = [smem((stages, C, LANES), dt), smem((stages, C, LANES), dt),
               smem((stages, C, V), dt), smem((stages, C, V), dt), smem((stages, C, V), dt),
               plgpu.SMEM((stages, rows.shape[2], C), f32),
               smem((stages, LANES, V), dt), smem((stages, LANES, V), dt),
               smem((C, C), dt), smem((C, C), dt)]
    if gated:
        scratch.append(smem((C, C), dt))
    scratch += [plgpu.SMEM((NS, C), f32),
                plgpu.Barrier(num_arrivals=8, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=stages)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, K), dt),
                jax.ShapeDtypeStruct((NKB, B, H, NS, Tp), f32)]
    name = "delta_grad_split"        # its name beside the removed one-consumer "delta_grad"
    check_smem(name, scratch)
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(progs,), grid_names=("p",),
                    scratch=scratch, name=name, num_threads=3)
    return kernel(q, k, do, u, dbv, rows, states, dstates)


def gate_terms(stats, C):
    """(dbeta, dg) [B, Tp, H] from the gradient kernel's per-chunk terms, the rows of STATS
    (dbeta without the rowsum(dB_v v) term; dg meaningful for a gated rule only)."""
    _, B, H, S, Tp = stats.shape
    x = stats.sum(0).reshape(B, H, S, Tp // C, C)
    Qq, R, Qd, dbp, Qi, Qk, dbs = (x[:, :, i] for i in range(len(STATS)))
    Qa, db = Qq + Qi, dbp + dbs
    after = jnp.flip(jnp.cumsum(jnp.flip(Qa, -1), -1), -1)           # sum_{i >= s}
    before = jnp.cumsum(Qk, -1)                                      # sum_{j < s}, exactly
    before = jnp.concatenate([jnp.zeros_like(before[..., :1]), before[..., :-1]], -1)
    dg = after + before + jnp.sum(Qd, -1, keepdims=True) + R
    move = lambda a: jnp.moveaxis(a.reshape(B, H, Tp), 1, 2)
    return move(db), move(dg)
