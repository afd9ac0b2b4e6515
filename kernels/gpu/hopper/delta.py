"""The delta rule and Gated DeltaNet on Hopper: Mosaic GPU kernels with TMA pipelines, wgmma and
warp-specialised warpgroups. The forward and the custom_vjp live here; the backward kernels in
`delta_bwd.py`.

The math (`linear_jax.ops.common.delta_chunk`; per chunk of C = 64 rows, G the chunk-local
cumulative gate, g = 0 for the delta rule, the rows gq, gk, dec of `common.gate_rows` and
ein = exp(G) in, beta the writing strengths):

    L     = strictly_lower(diag(beta) (K K^T * Gamma)),  Gamma_ij = exp(G_i - G_j), same document
    T     = (I + L)^-1
    W     = T diag(beta ein) K,        U = T diag(beta) V
    u     = U - W S_n
    o     = (q k^T * E) u + diag(gq) q S_n               E = scale Gamma on i >= j, same document
    S_n+1 = dec S_n + k^T diag(gk) u

Stages.
  `prep`  chunk-parallel (a persistent grid over (b, h, chunk)): the masked scores
          A = q k^T * E, T by recursive doubling on wgmma, then W and U; writes A, -W and U
          (bf16; the walk reads them) and, under differentiation, T (bf16, for the backward).
  `walk`  walks the chunks of each (b, h) in order with the float32 state on chip: u = U - W S_n
          (one wgmma onto U) and q S_n, then o = A u + gq q S_n and S_n+1. Under differentiation
          it also writes the entering state S_n of every chunk and u (bf16, the very tiles its
          wgmmas read).
  backward (`delta_bwd`): the reverse walk (dS carried on chip; writes dB_v = T^T du and every
          dS_n+1; with its value blocks in CTAs of their own it reads A^T from the forward
          instead of forming it), then a chunk-parallel gradient kernel; XLA finishes
          dv = beta dB_v, dbeta and the prefix sums of the gate gradient.

Why A, T, W, U are formed outside the walk. The walk is sequential in T: at B H = 16 (T = 32768)
it runs 16 (b, h) on 132 SMs and every instruction on its per-chunk chain is latency. The inverse
is a chain of ~16 dependent [64, 64] wgmmas; inside the walk it would multiply the walk by ~3.
Outside, it runs on all SMs, and the walk's own chain is two dependent wgmma groups per chunk
(W S_n, then k^T u), one more than simple_gla's. A moved out too (session 12): inside the walk its
q k^T, exponentials and masks took 1.1 us of a chunk's ~4.4 (H200, in-kernel trace), and A was
rounded to bf16 for A u there anyway, so writing it from the prep changes no bit of o.
The price is HBM traffic: A, -W and U are written and read once more (A 34 MB, -W and U 4 x
67 MB at the anchor shape, ~0.07 ms), against the ~0.5 ms a fused inverse would add to the walk
at T = 32768.

The inverse. T = (I + L)^-1 by recursive doubling of the diagonal blocks: X <- X - X M X with M the
part of L coupling two neighbouring b-blocks (exact: M X M = 0), b = 2, 4, .., 32 (b = 1 is
elementwise: X = I - M), as bf16 wgmmas with float32 accumulation: 10 products, relative error up
to ~1e-2 for correlated keys and beta near 2. One Newton step then restores float32-level accuracy:
R = I - (I + L) X with L X in split precision (hi + lo bf16, three wgmmas), X <- X + X R (R is
small, one bf16 wgmma): error ~1e-5 against float64 on the same inputs (random keys, correlated
keys, beta in (0, 2)). W and U take T in split precision too (two wgmmas each); they are then
rounded to bf16 once, as the inputs are.
`HopperDeltaConfig.prep_inverse="blocks"` (the default; "doubling" is the above alone): the
16 x 16 diagonal blocks are
solved exactly in float32 by forward substitution, one column a thread (64 threads, 16 steps of
independent FMAs; -L and X cross SMEM as untiled float32 tiles with padded rows), and only the
doubling's last two steps (b = 16, 32) run on wgmma: 4 dependent products instead of 10, the
steps that took ~5.3 of the 8.4 us a chunk. Per-thread code is Mosaic GPU's own (`inline_mgpu`);
the interpreter has none, so there the blocks come from the doubling (the tiles and refs are
tested, the substitution only on the device). On an H100 (session 18, T = 2048) the UT kernel
took 0.230 ms against the doubling's 0.275, its -W, U, A within 5e-5 of the doubling's.

Tiles and warpgroups (K, V in {64, 128}; C = 64).
  prep: grid (#SMs,), one consumer warpgroup taking every #SMs-th chunk, one producer (40
        registers) streaming q, k, v [64, K|V] bf16 and the gate rows into `stages_prep` slots.
        The consumer forms K K^T and q K^T (one wgmma group), L and A (A goes out by TMA at
        once), the inverse, then -W and U; every wgmma operand comes from SMEM (four [64, 64]
        bf16 tiles: X, Y, M and the Newton step's hi / lo parts, then T diag(.) as hi + lo), so
        no bf16 register operand is live while a wgmma runs, and the input slot is released as
        soon as the W, U products are done; -W, U (and T) leave through output tiles of their own
        (the last chunk's stores are waited for before they are rewritten): 180 KB at K = V = 128.
        Why: with T diag(.) hi + lo as register operands beside the [64, K] and [64, V] float32
        accumulators, ptxas spilled 532 bytes a thread and serialised the kernel's wgmmas (its
        C7512 warning; `kernel_report.py`, H200, session 12), and the kernel took 8.4 us a chunk:
        doubling 5.3, K K^T and L 2.0, Newton 1.6, W / U 1.8, stores 1.7 (waiting for the TMA
        store to read the slot before releasing it).
        Variant (`prep_two_ctas`, with "doubling"; slower: 0.327 ms against 0.275 on an H100,
        session 18): two CTAs to an SM, 2 x #SMs
        programs, so that two independent chains of dependent wgmmas hide each other's round
        trips. Each is one warpgroup loading its chunk into one slot and storing A over q, -W over
        k, U over v, T over a [64, 64] tile: 82 KB at K = V = 128 (58 KB at 64); ptxas: 255
        registers, no spills. A producer warpgroup would not fit: 232 + 40 registers a thread.
  walk: one producer streaming q, k, -W, U [64, K|V], A [64, 64] bf16 and the rows into 2 slots,
        and a consumer warpgroup per block of 64 value columns (the columns are independent),
        each owning its state columns in float32 registers (K/64 accumulator blocks of [64, 64]).
        Grid (B, H) with V/64 consumers in a CTA, or, where `HopperDeltaConfig.split_walk` says
        so (B H V/64 fits the SMs), grid (B, H, V/64) with one consumer per CTA, so that no SM
        runs two blocks' chains at once. Per chunk a consumer issues u = U + (-W) S_n and q S_n
        together (S_n bf16 in SMEM), stores u and gk u (bf16) to SMEM, then o = A u + gq q S_n and
        S <- dec S + k^T (gk u) together. The initial and final states cross SMEM as bf16 hi + lo
        pairs (the sum keeps ~16 bits), so no float32 tile is needed: 212 KB of SMEM at
        K = V = 128 (162 KB a CTA split).

Roofline at the anchor shapes (bf16, H = 16, K = V = 128, B T = 16384; H200 ~4.3 TB/s,
~790 TFLOP/s bf16; one [B, T, H, 128] bf16 tensor is 67 MB, 4096 chunk-heads):
  prep      reads q, k, v (201 MB), writes A (34 MB), -W, U (134 MB) (+ T)  369 MB   0.086 ms
            26 [64,64,64] wgmmas per chunk-head: 28 GFLOP                          0.036 ms
            latency: ~16 dependent wgmma steps per chunk, 31 chunks per SM: ~80 us
            measured on an H200 before session 12's register fix: 0.262 ms
  walk      reads q, k, -W, U (268 MB), A (34 MB), writes o (67 MB)     369 MB   0.086 ms
            (+ S_n 134 MB, u 67 MB under differentiation)
            latency-bound below B H ~ 132: 2 dependent wgmma groups + 2 SMEM round trips per
            chunk; measured before A moved out: 4.4 us a chunk with two consumers on an SM
            (mm1 1.8, elem 1.1, store_u 0.7, mm2 1.1, store_o 0.9), T = 2048 0.14 ms,
            T = 32768 (512 chunks, 16 CTAs) 1.6 ms
  forward   ~0.17 ms (T = 2048) against jax-linear-attention's 0.309 / 0.328 ms (deltanet /
            gated); at T = 32768 the walk dominates (anchors 0.742 / 0.825 ms): hence the
            two-level walk below.

The two-level walk (`two_level`, `HopperDeltaConfig.pieces`). Where B H leaves most SMs idle
(T = 32768: 16 sequences of 512 chunks), the sequence is cut into P pieces. The state update is
affine in the state, S_n+1 = (dec I - k^T diag(gk) W) S_n + k^T diag(gk) U, column by column, so
one state pass over K + V columns from [I | 0] (U read as 0 in the first K) ends every piece at
[M | E], its map S_end = M S_start + E (piece 0 starts its E columns from h0, so they end at its
true end state). A float32 scan over the pieces (P - 1 [K, K] x [K, V] products) gives each its
entering state, and the output pass walks all pieces at once from those. Documents need nothing
more: a reset makes dec and the chunk's rows read no state, which the maps carry. The state pass
(no q S, no A u, no o) costs ~0.6 of an output step (`configs.STATE_STEP`, a guess until timed):
at T = 32768, P = 4 runs 256 state CTAs (two waves) of 128 chunks and 128 output CTAs of 128
chunks, ~282 output steps in sequence against 512. The reverse walk is affine in dS the same way
(du = A^T do + gk k dS, dS_n = dec dS_n+1 + q^T (gq do) + W^T du) and is cut into the same
pieces (`delta_bwd.two_level_rev`: do read as 0 in the first K columns, the scan from the last
piece down).

Inputs bf16 / fp16 (fp32 raises ValueError); K, V <= 128 zero-padded to 64 or 128; T zero-padded
to a multiple of 64 (padded rows have beta = 0, k = v = 0: they write nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.configs import HopperDeltaConfig, multiprocessors
from linear_jax.kernels.gpu.hopper.common import (
    CONSUMER_REGS,
    LANES,
    Ops,
    check_smem,
    f32,
    gate_rows,
    grid_item,
    interpreting,
    launch,
    launch_walk,
    load,
    mm_sum,
    padded_doc,
    padded_inputs,
    pl,
    plgpu,
    prod,
    program_items,
    smem,
    split_hi_lo,
    split_hi_lo_xla,
    stage_state,
    term,
    unpadded,
    walk_setup,
)
from linear_jax.ops.common.chunking import pad_time


# -- gate rows and pair factors -------------------------------------------------------------------
def delta_rows(g, doc, beta, *, scale: float, C: int, H: int):
    """The per-token float32 rows of every delta kernel, [B, H, R, Tp], and their names: those of
    `common.gate_rows` (gq, gk, dec, and G, doc when present) and
        beta                               the writing strength
        ein = exp(G_i) in_i                factor of k_i in W (rows past a reset read no state)
    g None or [B, Tp, H] float32; doc None or [B, Tp] int32; beta [B, Tp, H]."""
    B, Tp = beta.shape[:2]
    base, names = gate_rows(g, doc, scale=scale, C=C, H=H)
    if base is None:                                   # no gate, no documents: constant rows
        base = jnp.broadcast_to(jnp.asarray([scale, 1.0, 1.0], f32)[None, None, :, None],
                                (B, H, 3, Tp))
    ein = base[:, :, names.index("gq")] / scale
    bt = jnp.moveaxis(beta.astype(f32), 2, 1)
    rows = jnp.concatenate([base, bt[:, :, None], ein[:, :, None]], axis=2)
    return rows, names + ("beta", "ein")


def pairs(ops, g, names, C, *, reverse: bool, strict: bool):
    """(mask, decay) of a chunk's intra pairs from its gate rows g ([R, C] in SMEM): mask the
    causal (strict: i > j) same-document pairs, decay exp(G_i - G_j) (None without a gate, <= 1
    on the mask, formed as a clamped span so nothing overflows off it). Rows of the [C, C] result
    are queries i, or keys j when `reverse` (the transpose)."""
    shape = (C, C)
    r, c = ops.iota(shape, 0), ops.iota(shape, 1)
    if reverse:
        mask = (c > r) if strict else (c >= r)
    else:
        mask = (r > c) if strict else (r >= c)
    # a vector is loaded once per layout (there is no register relayout row <-> column)
    if "doc" in names:
        d = g.at[names.index("doc")]
        mask = mask & (ops.rows_of(ops.row(d[...]), shape) == ops.cols_of(ops.col(d[...]), shape))
    if "G" not in names:
        return mask, None
    G = g.at[names.index("G")]
    Gr, Gc = ops.rows_of(ops.row(G[...]), shape), ops.cols_of(ops.col(G[...]), shape)
    span = (Gc - Gr) if reverse else (Gr - Gc)
    return mask, jnp.exp(jnp.minimum(span, 0.0))


def row_vec(ops, g, names, name, shape):
    """The named gate row of a chunk broadcast over the columns of a [64, N] tile."""
    return ops.rows_of(ops.row(g.at[names.index(name)][...]), shape)


# -- the UT transform -----------------------------------------------------------------------------
# `HopperDeltaConfig.prep_inverse="blocks"`: the diagonal blocks of SOLVE rows solved on the CUDA
# cores, through float32 tiles whose rows are padded by SOLVE_PAD floats (rows of 256 bytes put
# the stores of a register tile on few banks)
SOLVE = 16
SOLVE_PAD = 4


def solve_tiles(C: int = 64):
    """The float32 SMEM scratch of `diagonal_blocks`: -L and X, [C, C + SOLVE_PAD] each."""
    return [plgpu.SMEM((C, C + SOLVE_PAD), f32) for _ in range(2)]


@functools.cache
def _diagonal_blocks_kernel(C: int):
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, memref
    from jaxlib.mlir.dialects import math as mmath

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((C, C), f32, layout=plgpu.Layout.WGMMA))
    def solve(ctx, neg_l, nl_ref, x_ref):
        del ctx
        f, i32, idx = ir.F32Type.get(), ir.IntegerType.get_signless(32), ir.IndexType.get()
        c = mu.c
        zero, one = c(0.0, f), c(1.0, f)
        neg_l.store_untiled(nl_ref, optimized=False)
        mgpu.FragmentedArray.splat(zero, (C, C), layout=mgpu.WGMMA_LAYOUT).store_untiled(
            x_ref, optimized=False)
        mu.warpgroup_barrier()                     # -L and the zeros are seen by every thread
        tid = arith.remui(mu.thread_idx(), c(128, i32))
        # thread t < C solves column t of its block: x_j = r_j, then r_i += -L_ij x_j (i > j),
        # a chain of one FMA a step; the reads of -L are uniform over a block's 16 threads
        with mu.when(arith.cmpi(arith.CmpIPredicate.ult, tid, c(C, i32))):
            col = arith.index_cast(idx, tid)
            local = arith.remui(tid, c(SOLVE, i32))
            start = arith.index_cast(idx, arith.subi(tid, local))
            r = {i: arith.select(arith.cmpi(arith.CmpIPredicate.eq, local, c(i, i32)), one, zero)
                 for i in range(SOLVE)}
            for j in range(SOLVE):
                x_j = r.pop(j)
                row_j = arith.addi(start, c(j, idx))
                memref.store(x_j, x_ref, [row_j, col])
                for i in range(j + 1, SOLVE):
                    a = memref.load(nl_ref, [arith.addi(start, c(i, idx)), row_j])
                    r[i] = mmath.fma(a, x_j, r[i])
        mu.warpgroup_barrier()                     # every column is written before X is read
        return mgpu.FragmentedArray.load_untiled(x_ref, layout=mgpu.WGMMA_LAYOUT,
                                                 optimized=False)

    return solve


def diagonal_blocks(ops, L, solve):
    """The inverses of the [SOLVE, SOLVE] diagonal blocks of I + L, zero elsewhere, in float32:
    forward substitution by the consumer's first 64 threads, one column each, through the two
    float32 tiles `solve` (`solve_tiles`). The interpreter (no per-thread code) gets them from
    the recursive doubling up to b = SOLVE instead: the same blocks, to the doubling's rounding."""
    if ops.interpret:
        return None
    nl, xs = (t.at[:, :L.shape[0]] for t in solve)
    return _diagonal_blocks_kernel(L.shape[0])(-L, nl, xs)


def unit_lower_inverse(ops, L, tiles, dt, solve=None):
    """(I + L)^-1 for L [C, C] float32 strictly lower triangular (registers), through four
    [C, C] SMEM tiles of dtype dt (every wgmma operand from SMEM: see the module docstring).
    With `solve` (`solve_tiles`), the diagonal blocks of 16 come from `diagonal_blocks` and the
    doubling starts at b = 16: two merge steps instead of five doubling steps."""
    xt, yt, mt, rt = tiles
    C = L.shape[0]
    shape = (C, C)
    r, c = ops.iota(shape, 0), ops.iota(shape, 1)
    x = lax.bitwise_xor(r, c)                     # pairs whose highest differing bit is log2(b)

    def coupling(b):
        return jnp.where((x >= b) & (x < 2 * b), L, 0.0)

    # I is formed where it is used, not held: one [C, C] float32 tile fewer live across the wgmmas
    with jax.named_scope("doubling"):
        X, b = (None, 2) if solve is None else (diagonal_blocks(ops, L, solve), SOLVE)
        if X is None:                         # from b = 1 (also the interpreter's blocks)
            X, b = jnp.where(r == c, 1.0, 0.0) - coupling(1), 2
        while b < C:
            xt[...] = X.astype(dt)
            mt[...] = coupling(b).astype(dt)
            plgpu.commit_smem()
            Y = ops.dot(mt, xt)
            yt[...] = Y.astype(dt)
            plgpu.commit_smem()
            X = X - ops.dot(xt, yt)
            b *= 2
    # one Newton step, X <- X + X (I - (I + L) X), the residual in split precision
    with jax.named_scope("newton"):
        xh, xl = split_hi_lo(X, dt)
        lh, ll = split_hi_lo(L, dt)
        xt[...], yt[...], mt[...], rt[...] = xh, xl, lh, ll
        plgpu.commit_smem()
        (LX,) = mm_sum(ops, (None, [term(mt, xt), term(rt, xt), term(mt, yt)]))
        rt[...] = (jnp.where(r == c, 1.0, 0.0) - X - LX).astype(dt)
        plgpu.commit_smem()
        return ops.dot(xt, rt, acc=X)


def prep_scores(ops, qq, kk, g, *, names, scale, C):
    """(L, A) of a chunk, float32 [C, C], from its q, k tiles qq, kk and gate rows g in SMEM:
    L = strictly_lower(diag(beta) (K K^T * Gamma)) and the masked scores A = scale q K^T * Gamma
    on i >= j, same document (K K^T and q K^T in one wgmma group: q is not read after it)."""
    KK, QK = ops.mm(prod(kk, kk, tb=True), prod(qq, kk, tb=True))
    mask, decay = pairs(ops, g, names, C, reverse=False, strict=False)
    off = ops.iota((C, C), 0) != ops.iota((C, C), 1)
    L = KK * row_vec(ops, g, names, "beta", (C, C))
    L = jnp.where(mask & off, L if decay is None else L * decay, 0.0)
    A = jnp.where(mask, QK * scale if decay is None else QK * (scale * decay), 0.0)
    return L, A


def prep_wu(ops, Tm, kk, vv, g, tl, *, names, dt):
    """(-W, U) of a chunk, float32: -T diag(beta ein) K and T diag(beta) V from T (float32
    [C, C]), its k, v tiles kk, vv and gate rows g, T diag(.) written as hi + lo into the four
    [C, C] tiles tl and both products issued at once (k, v and tl are read until it returns)."""
    C = Tm.shape[0]
    ib, ie = names.index("beta"), names.index("ein")
    # T diag(beta) and -T diag(beta ein) as hi + lo tiles, both products at once
    Tb = Tm * ops.cols_of(ops.col(g.at[ib][...]), (C, C))
    tl[0][...], tl[1][...] = split_hi_lo(Tb, dt)
    Tw = -(Tb * ops.cols_of(ops.col(g.at[ie][...]), (C, C)))
    tl[2][...], tl[3][...] = split_hi_lo(Tw, dt)
    plgpu.commit_smem()
    return mm_sum(ops, (None, [term(tl[2], kk), term(tl[3], kk)]),
                  (None, [term(tl[0], vv), term(tl[1], vv)]))


class PrepGeometry:
    """What both UT kernels (`prep`, `prep_two_ctas`) derive from their inputs: `shape` (B, Tp, H,
    K, V, C, dtype, N chunks, B H N items, programs, R gate rows), `ops`, `heads_fastest`."""

    def __init__(self, k, v, rows, cfg, per_sm):
        B, Tp, H, K = k.shape
        C, N = cfg.chunk, Tp // cfg.chunk
        items = B * H * N
        progs = max(1, min(per_sm * (cfg.programs or multiprocessors(jax.devices()[0])), items))
        self.shape = (B, Tp, H, K, v.shape[-1], C, k.dtype, N, items, progs, rows.shape[2])
        self.ops = Ops(interpreting(cfg))
        self.heads_fastest = cfg.item_order == "heads"

    def out_type(self, residuals):
        """-W, U [B, Tp, H, K|V], A (and T) [B, H, N, C, C], all in the inputs' dtype."""
        B, Tp, H, K, V, C, dt, N = self.shape[:8]
        out = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt),
               jax.ShapeDtypeStruct((B, H, N, C, C), dt)]
        return out + [jax.ShapeDtypeStruct((B, H, N, C, C), dt)] * residuals


def prep(q, k, v, rows, *, names, scale, cfg, residuals):
    """-W, U [B, Tp, H, K|V] and the masked scores A [B, H, N, C, C] (scale q k^T * Gamma on
    i >= j, same document) in k's dtype, and with `residuals` T [B, H, N, C, C], of every chunk,
    chunk-parallel. rows: `delta_rows`. `HopperDeltaConfig.prep_two_ctas`: `prep_two_ctas`."""
    if cfg.prep_two_ctas:
        return prep_two_ctas(q, k, v, rows, names=names, scale=scale, cfg=cfg,
                             residuals=residuals)
    geo = PrepGeometry(k, v, rows, cfg, per_sm=1)
    B, Tp, H, K, V, C, dt, N, items, progs, R = geo.shape
    ops, hf, out_type = geo.ops, geo.heads_fastest, geo.out_type(residuals)
    stages = cfg.stages_prep
    blocks = cfg.prep_inverse == "blocks"

    def body(q_ref, k_ref, v_ref, g_ref, wm_ref, u_ref, a_ref, *refs):
        refs = list(refs)
        t_ref = refs.pop(0) if residuals else None
        qs, ks, vs, gs, tiles, wo, uo, ao, *refs = refs
        to = refs.pop(0) if residuals else None
        solve = [refs.pop(0), refs.pop(0)] if blocks else None
        in_bar, used_bar = refs
        pid, w, count = program_items(items, progs)

        def issue(i, slot):
            b, h, n = grid_item(pid + i * progs, H, N, heads_fastest=hf)
            t = pl.ds(n * C, C)
            load(in_bar.at[slot], slot, (q_ref.at[b, t, h], qs), (k_ref.at[b, t, h], ks),
                 (v_ref.at[b, t, h], vs), (g_ref.at[b, h, :, t], gs))

        ops.producer(w == 1, issue, count, stages, used_bar)

        @pl.when(w == 0)
        def _consumer():
            ops.registers(CONSUMER_REGS, "increase")
            tl = [tiles.at[i] for i in range(4)]

            @pl.loop(0, count)
            def _(i):
                j = lax.rem(i, stages)
                b, h, n = grid_item(pid + i * progs, H, N, heads_fastest=hf)
                t = pl.ds(n * C, C)
                kk, vv, g = ks.at[j], vs.at[j], gs.at[j]
                with jax.named_scope("wait"):
                    plgpu.barrier_wait(in_bar.at[j])
                with jax.named_scope("kkt"):
                    L, A = prep_scores(ops, qs.at[j], kk, g, names=names, scale=scale, C=C)
                    # the last chunk's stores have had this chunk's loads to read their tiles
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    ao[...] = A.astype(dt)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(ao, a_ref.at[b, h, n])
                Tm = unit_lower_inverse(ops, L, tl, dt, solve)
                with jax.named_scope("wu"):
                    Wm, U = prep_wu(ops, Tm, kk, vv, g, tl, names=names, dt=dt)
                plgpu.barrier_arrive(used_bar.at[j])   # the slot's reads are complete
                with jax.named_scope("store"):
                    wo[...] = Wm.astype(dt)        # the last chunk's stores of wo, uo, to are
                    uo[...] = U.astype(dt)         # complete: waited for before ao's
                    if residuals:
                        to[...] = Tm.astype(dt)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(wo, wm_ref.at[b, t, h])
                    plgpu.copy_smem_to_gmem(uo, u_ref.at[b, t, h])
                    if residuals:
                        plgpu.copy_smem_to_gmem(to, t_ref.at[b, h, n])

            plgpu.wait_smem_to_gmem(0)

    scratch = [smem((stages, C, K), dt), smem((stages, C, K), dt), smem((stages, C, V), dt),
               plgpu.SMEM((stages, R, C), f32), smem((4, C, C), dt),
               smem((C, K), dt), smem((C, V), dt), smem((C, C), dt)]
    scratch += [smem((C, C), dt)] if residuals else []
    scratch += solve_tiles() if blocks else []
    scratch += [plgpu.Barrier(num_arrivals=4, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages)]
    check_smem("delta prep", scratch)
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(progs,), grid_names=("p",),
                    scratch=scratch, name="delta_prep", num_threads=2)
    return kernel(q, k, v, rows)


def prep_two_ctas(q, k, v, rows, *, names, scale, cfg, residuals):
    """`prep` as CTAs of one warpgroup and one input slot, two CTAs to an SM
    (`HopperDeltaConfig.prep_two_ctas`): the SMs run two chunks' dependent wgmma chains at once.

    The warpgroup loads its chunk itself: with one slot a producer warpgroup could not run ahead
    of it, and `prep`'s two warpgroups launch at 232 registers a thread (ptxas), 58 K of an
    SM's 64 K registers: no second CTA fits beside one, whatever its SMEM. One warpgroup of 255
    registers (ptxas, K = V = 128, no spills) takes half. Every output goes out through the
    input slots: A over q (q K^T is q's last read; at K = 128 a [C, C] tile aliased with the q
    slot), -W over k and U over v once the W, U wgmmas have read them, T through the first of
    the four [C, C] tiles (which the next chunk's inverse rewrites first). The next chunk is
    loaded once those stores have read SMEM. SMEM 82 KB at K = V = 128, 58 KB at K = V = 64
    (T included; +8 KB at K = 128 in the interpreter, which cannot alias)."""
    # twice the CTAs of `prep`: two on each SM (`cfg.programs` counts SMs here)
    geo = PrepGeometry(k, v, rows, cfg, per_sm=2)
    B, Tp, H, K, V, C, dt, N, items, progs, R = geo.shape
    ops, hf, out_type = geo.ops, geo.heads_fastest, geo.out_type(residuals)

    def body(q_ref, k_ref, v_ref, g_ref, wm_ref, u_ref, a_ref, *refs):
        refs = list(refs)
        t_ref = refs.pop(0) if residuals else None
        qa, ks, vs, gs, tiles, in_bar = refs
        qs, ao = (qa, qa.at[0]) if K == C else qa
        pid, _, count = program_items(items, progs)
        tl = [tiles.at[i] for i in range(4)]
        kk, vv, g = ks.at[0], vs.at[0], gs.at[0]

        @pl.loop(0, count)
        def _(i):
            b, h, n = grid_item(pid + i * progs, H, N, heads_fastest=hf)
            t = pl.ds(n * C, C)
            with jax.named_scope("wait"):   # the last chunk's stores have read the slot
                load(in_bar.at[0], 0, (q_ref.at[b, t, h], qs), (k_ref.at[b, t, h], ks),
                     (v_ref.at[b, t, h], vs), (g_ref.at[b, h, :, t], gs))
                plgpu.barrier_wait(in_bar.at[0])
            with jax.named_scope("kkt"):
                L, A = prep_scores(ops, qs.at[0], kk, g, names=names, scale=scale, C=C)
                ao[...] = A.astype(dt)                 # over q: q K^T has read it
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(ao, a_ref.at[b, h, n])
            Tm = unit_lower_inverse(ops, L, tl, dt)
            with jax.named_scope("wu"):
                Wm, U = prep_wu(ops, Tm, kk, vv, g, tl, names=names, dt=dt)
            with jax.named_scope("store"):
                kk[...] = Wm.astype(dt)                # the W, U wgmmas have read k, v, tl
                vv[...] = U.astype(dt)
                if residuals:
                    tl[0][...] = Tm.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(kk, wm_ref.at[b, t, h])
                plgpu.copy_smem_to_gmem(vv, u_ref.at[b, t, h])
                if residuals:
                    plgpu.copy_smem_to_gmem(tl[0], t_ref.at[b, h, n])
                # every store has read its tile before the next chunk's loads (and inverse)
                # overwrite it
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        plgpu.wait_smem_to_gmem(0)

    qslot = smem((1, C, K), dt)
    if K != C:           # A's tile aliased with the q slot (separate in the interpreter)
        qslot = (plgpu.RefUnion if not ops.interpret else lambda *t: t)(qslot, smem((C, C), dt))
    scratch = [qslot, smem((1, C, K), dt), smem((1, C, V), dt), plgpu.SMEM((1, R, C), f32),
               smem((4, C, C), dt), plgpu.Barrier(num_arrivals=4, num_barriers=1)]
    check_smem("delta prep (two CTAs)", scratch, per_sm=2,
               fix="set HopperDeltaConfig.prep_two_ctas=False")
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(progs,), grid_names=("p",),
                    scratch=scratch, name="delta_prep_two_ctas", num_threads=1)
    return kernel(q, k, v, rows)


# -- the forward walk -----------------------------------------------------------------------------
def walk(q, k, wm, u0, A, rows, s0, *, names, cfg, residuals, pieces=1, emit="out"):
    """The sequential walk over the chunks of each (b, h), or of each of its `pieces` P pieces of
    N/P chunks, every piece from its own entering state.

    k, wm (-W) [B, Tp, H, K]; u0 (U) [B, Tp, H, V]; rows `delta_rows`; s0 the pieces' entering
    states as (hi, lo) [B, H, P, K, X] in k's dtype.
    emit "out": X = V; q [B, Tp, H, K] and A [B, H, N, C, C] the masked scores (`prep`). Returns
      o [B, Tp, H, V], each piece's end state as (hi, lo) [B, H, P, K, V], and with `residuals`
      the entering states [B, H, N, K, V] and u [B, Tp, H, V] (k's dtype).
    emit "state": the state pass of the two-level walk (`two_level`); q, A None and X = K + V:
      the state update alone, over K + V columns [M | E] whose first K read U as 0, so that from
      [I | S] a piece ends at [M | M S + E], its affine map. Returns the end states (hi, lo)
      [B, H, P, K, K + V].

    The value columns are independent (u, o and the state's columns only mix over keys), so each
    block of 64 runs on a consumer warpgroup of its own: in one CTA per (b, h, piece), or, where
    `HopperDeltaConfig.split_walk` says so (and always in the state pass), in a CTA of its own.
    """
    out, P = emit == "out", pieces
    B, Tp, H, K, V, C, dt, N, NW, NKB, L, stages = walk_setup(k, u0, cfg, P)
    X, NB, split, NC, UV = walk_columns(cfg, out, B, H, P, K, V)
    ops = Ops(interpreting(cfg))
    blk = (C, LANES)

    def body(*refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None       # noqa: E731
        q_ref, k_ref, w_ref, u_ref, a_ref = pop(out), pop(), pop(), pop(), pop(out)
        g_ref, s0h_ref, s0l_ref, o_ref, sh_ref, sl_ref = pop(), pop(), pop(), pop(out), pop(), pop()
        states_ref, uo_ref = pop(out and residuals), pop(out and residuals)
        xs, ys, ws, zs, as_, gs = pop(out), pop(), pop(), pop(), pop(out), pop()
        st, ut, gt = pop(), pop(out), pop()
        in_bar, used_bar, own_bar = refs
        b, h, w = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
        p, cb, uc, ucoef = walk_cell(split, out, NB, NKB, V)

        def issue(step, slot):
            t = pl.ds((p * L + step) * C, C)
            pairs_ = [(k_ref.at[b, t, h], ys), (w_ref.at[b, t, h], ws),
                      (u_ref.at[b, t, h, uc], zs), (g_ref.at[b, h, :, t], gs)]
            if out:
                pairs_ += [(q_ref.at[b, t, h], xs), (a_ref.at[b, h, p * L + step], as_)]
            load(in_bar.at[slot], slot, *pairs_)

        @ops.walk_warpgroups(w, NC, (issue, L, stages, used_bar), cb, NKB)
        def _consumer(vc, kblk):                           # vc: the block's columns in GMEM
            vl = pl.ds(0 if split else w * LANES, LANES)   # and in the U slot
            sw, gw = st.at[w], gt.at[w]
            uw = ut.at[w] if out else None
            view = lambda r: r.at[b, h, p, :, vc]          # noqa: E731
            S = load_state(ops, (s0h_ref, s0l_ref), view, sw, own_bar.at[w], kblk)

            def step_fn(step, S):
                slot = lax.rem(step, stages)
                n = p * L + step
                t = pl.ds(n * C, C)
                yk, wmm, zu, g = ys.at[slot], ws.at[slot], zs.at[slot], gs.at[slot]
                with jax.named_scope("wait"):
                    plgpu.barrier_wait(in_bar.at[slot])
                if out and residuals:                     # S_n, as this chunk reads it
                    plgpu.copy_smem_to_gmem(sw, states_ref.at[b, h, n, :, vc])
                with jax.named_scope("mm1"):
                    Uc = ops.acc(zu.at[:, vl][...]).astype(f32)
                    if out:
                        u, o = mm_sum(ops, (Uc, [term(wmm, sw)]), (None, [term(xs.at[slot], sw)]))
                    else:
                        (u,) = mm_sum(ops, (Uc * ucoef, [term(wmm, sw)]))
                with jax.named_scope("elem"):
                    if out:
                        o = o * row_vec(ops, g, names, "gq", blk)
                    dec = g[names.index("dec"), 0]
                with jax.named_scope("store_u"):
                    if out:   # the last chunk's stores (o from gw, u from uw), this one's state
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        uw[...] = u.astype(dt)
                    gw[...] = (u * row_vec(ops, g, names, "gk", blk)).astype(dt)
                    plgpu.commit_smem()
                if out and residuals:
                    plgpu.copy_smem_to_gmem(uw, uo_ref.at[b, t, h, vc])
                with jax.named_scope("mm2"):
                    upd = [prod(yk.at[:, kr], gw, S[i] * dec, ta=True) for i, kr in enumerate(kblk)]
                    if out:
                        o, *S = ops.mm(prod(as_.at[slot], uw, o), *upd)
                    else:
                        S = ops.mm(*upd)
                # o leaves through gw, which the S update has read
                return end_step(S, sw, kblk, used_bar.at[slot], "store_o",
                                (o, gw, o_ref.at[b, t, h, vc]) if out else None)

            S = lax.fori_loop(0, L, step_fn, tuple(S))
            store_state(S, (sh_ref, sl_ref), view, sw, kblk, dt)

    end = jax.ShapeDtypeStruct((B, H, P, K, X), dt)
    out_type = ([jax.ShapeDtypeStruct((B, Tp, H, V), dt)] if out else []) + [end, end]
    if out and residuals:
        out_type += [jax.ShapeDtypeStruct((B, H, N, K, V), dt),
                     jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    scratch = [smem((stages, C, K), dt)] if out else []
    scratch += [smem((stages, C, K), dt), smem((stages, C, K), dt), smem((stages, C, UV), dt)]
    scratch += [smem((stages, C, C), dt)] if out else []
    scratch += [plgpu.SMEM((stages, rows.shape[2], C), f32), smem((NC, K, LANES), dt)]
    scratch += [smem((NC, C, LANES), dt)] * (2 if out else 1)
    check_smem("delta walk", scratch)
    kernel = launch_walk(body, cfg, ops, out_type=out_type, scratch=scratch, cells=(B, H, P, NB),
                         consumers=NC, copies=6 if out else 4, stages=stages, name="delta_walk",
                         out=out, split=split)
    args = ((q,) if out else ()) + (k, wm, u0) + ((A,) if out else ()) + (rows, *s0)
    return kernel(*args)


def walk_columns(cfg, out: bool, B: int, H: int, P: int, K: int, V: int):
    """(X, NB, split, NC, VL) of a walk (forward or reverse) over P pieces: the X state columns
    it walks (V; K + V in a state pass) in NB blocks of 64, whether each block runs in a CTA of
    its own (`split`: `HopperDeltaConfig.split_walk`, always in a state pass), the consumer
    warpgroups of a CTA (NC) and the columns of the values (U or do) a CTA loads (VL)."""
    X, NW = (V if out else K + V), V // LANES
    split = cfg.split_walk(B * H * P, NW, multiprocessors(jax.devices()[0])) if out else True
    return X, X // LANES, split, 1 if split else NW, LANES if split else V


def walk_cell(split: bool, out: bool, NB: int, NKB: int, V: int):
    """(piece p, column block cb, the columns of the values (U or do) its CTA loads, their factor)
    of a walk CTA (forward or reverse). Split, the grid's third axis "c" enumerates (piece, block
    of NB); joint, it is the piece "p" and the block is the warpgroup. In a state pass (`out`
    False) the first NKB blocks are the map columns M, which read the values as 0."""
    if split:
        c = lax.axis_index("c")
        p, cb = lax.div(c, NB), lax.rem(c, NB)
    else:
        p, cb = lax.axis_index("p"), lax.axis_index("wg")
    if out:
        return p, cb, (pl.ds(cb * LANES, LANES) if split else pl.ds(0, V)), None
    return (p, cb, pl.ds(jnp.maximum(cb - NKB, 0) * LANES, LANES),
            jnp.where(cb >= NKB, 1.0, 0.0))


def map_starts(S, pieces: int, at: int, dt):
    """The state pass's entering columns [I | 0] of every piece, [I | S] for piece `at`, as
    (hi, lo) [B, H, P, K, K + V] in dt; S float32 [B, H, K, V]."""
    B, H, K, V = S.shape
    eye = jnp.broadcast_to(jnp.eye(K, dtype=f32), (B, H, pieces, K, K))
    first = jnp.zeros((B, H, pieces, K, V), f32).at[:, :, at].set(S)
    return split_state(jnp.concatenate([eye, first], -1), dt)


def scan_pieces(ends, S, *, reverse: bool):
    """The pieces' entering states [B, H, P, K, V] (float32) from the state pass's end states
    `ends` (hi, lo) [B, H, P, K, K + V], [M | E] per piece, the first piece walked (the last when
    `reverse`) having started its E columns from S: each next piece enters at M S + E."""
    ME = ends[0].astype(f32) + ends[1].astype(f32)
    P, K = ME.shape[2], ME.shape[3]
    M, E = ME[..., :K], ME[..., K:]
    order = list(range(P - 1, -1, -1)) if reverse else list(range(P))
    starts = {order[0]: S}
    S = E[:, :, order[0]]
    for p in order[1:]:            # (the last piece's end is unused: XLA drops its product)
        starts[p] = S
        S = jnp.einsum("bhij,bhjv->bhiv", M[:, :, p], S, precision=lax.Precision.HIGHEST) + \
            E[:, :, p]
    return jnp.stack([starts[p] for p in range(P)], 2)


def two_level(q, k, wm, u0, A, rows, h0, *, names, cfg, residuals, pieces):
    """The forward walk from h0 (float32 [B, H, K, V]) cut into `pieces` P pieces walked in
    parallel: the state pass gives each piece's affine map S_end = M S_start + E (piece 0's from
    h0: its E columns start there), a float32 scan over the pieces gives their entering states,
    and the output pass walks every piece from its own (P = 1: the single-level walk). Returns
    what `walk` (emit "out") does, the end states of every piece."""
    dt = k.dtype
    if pieces == 1:
        return walk(q, k, wm, u0, A, rows, split_state(h0[:, :, None], dt), names=names, cfg=cfg,
                    residuals=residuals)
    ends = walk(None, k, wm, u0, None, rows, map_starts(h0, pieces, 0, dt), names=names, cfg=cfg,
                residuals=False, pieces=pieces, emit="state")
    starts = scan_pieces(ends, h0, reverse=False)
    return walk(q, k, wm, u0, A, rows, split_state(starts, dt), names=names, cfg=cfg,
                residuals=residuals, pieces=pieces)


def load_state(ops, refs, view, sw, bar, kblk):
    """The float32 state columns view(ref) of (hi, lo) in GMEM ([K, 64] each), through the bf16
    state tile sw, as K/64 accumulator blocks; sw is left holding hi + lo rounded (the chunk's
    S_n)."""
    S = None
    for ref in refs:
        plgpu.copy_gmem_to_smem(view(ref), sw, bar)
        plgpu.barrier_wait(bar)
        part = [ops.acc(sw[kr, :]).astype(f32) for kr in kblk]
        S = part if S is None else [a + p for a, p in zip(S, part, strict=True)]
        plgpu.commit_smem()                               # every read of sw before it is reused
    stage_state(S, sw, kblk)
    return S


def end_step(S, sw, kblk, slot_bar, scope: str, out=None):
    """The end of a walk's chunk step (forward or reverse): its ring slot released on slot_bar
    (every read of it is complete), then, under the named scope `scope`, the new state blocks S
    staged into sw and `out` sent (`stage_state`). Returns S as the loop's carry."""
    plgpu.barrier_arrive(slot_bar)
    with jax.named_scope(scope):
        stage_state(S, sw, kblk, out)
    return tuple(S)


def store_state(S, refs, view, sw, kblk, dt):
    """The float32 state blocks S to (hi, lo) in GMEM (the [K, 64] views view(ref)) through the
    state tile sw."""
    hi_ref, lo_ref = refs
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    his = []
    for i, kr in enumerate(kblk):
        hi = S[i].astype(dt)
        his.append(hi)
        sw[kr, :] = hi
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sw, view(hi_ref))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for i, kr in enumerate(kblk):
        sw[kr, :] = (S[i] - his[i].astype(f32)).astype(dt)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(sw, view(lo_ref))
    plgpu.wait_smem_to_gmem(0)


def split_state(S, dt):
    """A float32 state as (hi, lo) in dt (what `walk` reads)."""
    return split_hi_lo_xla(S, dt)


# -- custom_vjp and the op entry ------------------------------------------------------------------
@functools.cache
def _core(cfg: HopperDeltaConfig, scale: float, gated: bool, has_doc: bool):
    """custom_vjp of (q, k, v, g, beta, doc, h0) -> (o, S_end) on padded inputs."""
    from linear_jax.kernels.gpu.hopper import delta_bwd

    C = cfg.chunk

    def rows_of(g, doc, beta, H):
        return delta_rows(g if gated else None, doc if has_doc else None, beta, scale=scale,
                          C=C, H=H)

    def pieces_of(q, v):                           # the two walks' P (the same cut both ways)
        B, Tp, H, K = q.shape
        return cfg.pieces_for(B * H, K, v.shape[-1], Tp // C, multiprocessors(jax.devices()[0]))

    def fwd(q, k, v, g, beta, doc, h0, residuals=True):
        rows, names = rows_of(g, doc, beta, q.shape[2])
        wm, u0, A, *tm = prep(q, k, v, rows, names=names, scale=scale, cfg=cfg,
                              residuals=residuals)
        o, sh, sl, *res = two_level(q, k, wm, u0, A, rows, h0, names=names, cfg=cfg,
                                    residuals=residuals, pieces=pieces_of(q, v))
        S = sh[:, :, -1].astype(f32) + sl[:, :, -1].astype(f32)
        if not residuals:
            return (o, S), None
        states, u = res
        return (o, S), (q, k, v, g, beta, doc, wm, tm[0], A, states, u)

    def bwd(res, cts):
        q, k, v, g, beta, doc, wm, tm, A, states, u = res
        do, dS = cts
        dt = q.dtype
        do = do.astype(dt)
        rows, names = rows_of(g, doc, beta, q.shape[2])
        dbv, dh, dl, dstates = delta_bwd.two_level_rev(q, k, do, wm, tm, A, rows, dS,
                                                       names=names, scale=scale, cfg=cfg,
                                                       pieces=pieces_of(q, v))
        dh, dl = dh[:, :, 0], dl[:, :, 0]
        dq, dk, stats = delta_bwd.grad(q, k, do, u, dbv, rows, states, dstates, names=names,
                                       scale=scale, cfg=cfg)
        dbvf = dbv.astype(f32)
        dv = (dbvf * beta[..., None]).astype(v.dtype)
        dbeta, dg = delta_bwd.gate_terms(stats, C)
        dbeta = dbeta + jnp.sum(dbvf * v.astype(f32), axis=-1)
        dg = dg if gated else jnp.zeros_like(g)
        return dq, dk, dv, dg, dbeta, None, dh.astype(f32) + dl.astype(f32)

    f = jax.custom_vjp(lambda *a: fwd(*a, residuals=False)[0])
    f.defvjp(fwd, bwd)
    return f


def delta(q, k, v, g, beta, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry of delta_rule (g None) and gated_delta_rule (the kernel registry's
    signature).

    q, k [B, T, H, K] (heads expanded), v [B, T, H, V], bf16 or fp16 (float32: ValueError);
    g None or [B, T, H] log decays <= 0; beta [B, T, H] (any float dtype); initial_state None or
    [B, H, K, V]; segment_ids None or [B, T]. K, V <= 128 (zero-padded to 64 or 128), T padded to
    a multiple of 64 (chunk_size does not change the kernels' chunk). Returns (o [B, T, H, V] in
    v's dtype, S [B, H, K, V] float32), differentiable in q, k, v, g, beta and initial_state.
    """
    cfg = (config or HopperDeltaConfig.default(jax.devices()[0])).for_chunk(chunk_size)
    B, _, H, _ = q.shape
    Tp, _, qkv, h0 = padded_inputs("delta_rule", q, k, v, initial_state, cfg.chunk)
    gp = jnp.zeros((B, Tp, H), f32) if g is None else pad_time(g.astype(f32), Tp)
    bp = pad_time(beta.astype(f32), Tp)
    doc = (jnp.zeros((B, Tp), jnp.int32) if segment_ids is None else padded_doc(segment_ids, Tp))
    if h0 is None:
        h0 = jnp.zeros((B, H) + tuple(x.shape[-1] for x in qkv[1:]), f32)
    core = _core(cfg, float(scale), g is not None, segment_ids is not None)
    return unpadded(*core(*qkv, gp, bp, doc, h0), q, v)
