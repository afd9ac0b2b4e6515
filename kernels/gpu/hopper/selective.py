"""Mamba-1's selective scan (S6) on Hopper: Mosaic GPU kernels, the step size, D skip and z gate
fused, TMA-fed, the state of 64 channels x N held in registers for the whole sequence.

The math (per channel d, state entry n; `linear_jax.ops.selective_scan` states the op):

    dt_t = softplus(delta_t + bias)    (delta_t + bias without softplus)
    a_t  = exp(dt_t A[d, n]) keep_t    (keep_t = 0 where a document starts at t)
    h_t  = a_t h_{t-1} + dt_t u_t B_t[n]
    y_t  = ((C_t . h_t) + D u_t) silu(z_t)

Choice of the time-parallel form. Every (b, d, n) is an independent first-order recurrence with its
own decay exp(dt_t A[d, n]): unlike Mamba-2's scalar gate, the decay differs along n, so a chunked
matmul form (SSD) needs [C, C] decay factors per (d, n), i.e. 2 exps per (t, d, n) (e^{L_t},
e^{-L_s}) and rebased exponents with a sequential fallback at strong decay (what the Triton kernel
does), while the sequential scan needs exactly one exp per (t, d, n) and no cancellation. At the
anchor shape the work is bound by those exps, not by bytes or FLOPs (below), so the kernel is the
sequential scan, parallel over channels: a warpgroup owns 64 channels x N (N padded to a multiple
of 8) as one [64, N] float32 tile in the wgmma accumulator layout (8 elements a thread at N = 16),
walks T step by step (each step's chain on h is one FMA; the exp, the input term and the output
reduction of step t do not wait on step t - 1, so the unrolled steps overlap), and TMA streams
[C, 64] row tiles of u, delta, z (and [C, N] tiles of B, C) `stages` chunks ahead.
Grid (B, D / 64): 128 CTAs at B = 4, D = 2048.

Roofline at B = 4, T = 4096, D = 2048, N = 16, bf16 (H200: ~4.3 TB/s, MUFU ~16 ex2 / clk / SM
x 132 SMs x 1.98 GHz ~ 4.2 T exp/s, ~67 TFLOP/s float32 FMA):
  forward    bytes  u, delta, z in (3 x 67 MB), y out (67 MB), B, C (1 MB)      269 MB   0.063 ms
             exps   B T D N = 537 M (decays) + 2 B T D (softplus, sigmoid)      0.14 ms  <- bound
             FLOPs  ~6 per (t, d, n) (decay arg, FMA, input term, C h) 3.2 G   0.05 ms
  backward   bytes  u, delta, z, dy in (4 x 67 MB), du, ddelta, dz out (3 x 67 MB), the
             states every C steps (written by the forward, read here: B D N (T / C) 4 B =
             134 MB at C = 16), dB / dC per channel block (B (D / 64) T N 4 B x 2 = 67 MB)
                                                                              ~670 MB   0.16 ms
             exps   2 B T D N (the decays recomputed in the reverse pass)      0.26 ms  <- bound
  So the forward sits at ~0.14 ms (and its latency: T steps at ~8 dependent cycles), the
  forward + backward (1.07 GB, 3 exps per (t, d, n)) at ~0.4-0.5 ms; jax-linear-attention's
  mamba1 measured 0.82 / 2.15 ms. Storing the states less often (every 64 steps: 34 MB) would
  cost a third exp per element in the backward (a second recompute): more than the bytes save.

Backward (`jax.custom_vjp`): the forward under differentiation writes the state entering every
chunk of C = 16 steps ([B, T / C, N, D] float32). The backward walks the chunks in reverse: it
reloads the chunk's entering state, recomputes the chunk's C states forward (kept in registers:
C tiles of 8 values a thread), then runs the reverse steps with dy's cotangent:

    dy'_t = dy_t silu(z_t),   dz_t = dy_t (C_t . h_t + D u_t) silu'(z_t)
    g_t   = dy'_t C_t + lam_t                          (lam_t = a_{t+1} g_{t+1}, lam = dh_T)
    e_t   = g_t a_t h_{t-1}                            (d / d(dt_t A))
    d dt  = sum_n e_t A + u_t sum_n g_t B_t,   du_t = dt_t sum_n g_t B_t + D dy'_t
    ddelta_t = d dt_t sigmoid(delta_t + bias)   (d dt_t without softplus)
    dA   += e_t dt_t,   dB_t = sum_d g_t dt_t u_t,   dC_t = sum_d dy'_t h_t,   dD += dy'_t u_t
    dh0   = lam after step 0

dB and dC are summed over the block's 64 channels in the kernel and over blocks in XLA; dA, dD,
dbias over the batch in XLA.

Layouts: a [64] row vector in the accumulator layout cannot be loaded from a bf16 row (Mosaic GPU
loads 1-D bf16 vectors only in multiples of 128), so each chunk's [C, 64] bf16 tiles are widened to
float32 in SMEM once (a 2-D load / store) and the steps read float32 rows; outputs go the other way.
The [64, N] state tiles move to and from SMEM as N rows of 64 channels (masked row sums / selects;
the states in HBM are [N, 64]-tiled, channels contiguous), once per chunk.

The default (`HopperSelectiveConfig` per_thread_forward, per_thread_backward, thread_channels =
64, since session 20): the per-thread layout. `_forward_threads` gives each channel to a group of
threads with its N states as scalars in their registers and B_t, C_t read as scalars: no sum over
a tile's row per step, the rows loaded without the float32 widening; it writes the states either
backward reads. `_backward_threads` walks the same layout in reverse: per chunk the states
entering its sub-chunks of S steps (S = 2 at N = 16) recomputed into SMEM, each sub-chunk's S
states and decays recomputed into registers and walked in reverse with no cross-thread sum over
n beyond the group's; dB_t, dC_t summed over the block's channels once per sub-chunk (per-thread
products in SMEM, one barrier, row sums of [64, width] tiles); no auto barriers (9 barriers a
chunk of 16 steps against ~15 a step in `_backward`). `thread_channels` is the channels a CTA:
128 (one thread a channel; 64 CTAs at B = 4, D = 2048, half an H100's SMs idle), 64 (two threads
a channel, N / 2 states each, one shuffle per sum: 128 CTAs) or 32 (four threads, two shuffles:
256 CTAs, two an SM) (`_Lanes`). On an H100 (B = 4, T = 4096, D = 2048, N = 16) the
fwd+bwd took 5.65 ms with the tile kernels above, 3.58 at width 128 and 2.37 at 64 (jla 1.87);
the forward 0.62 / 0.63 / 0.54 (jla 0.56). The tile kernels stay for `per_thread_* = False`.

Inputs: u, delta, z bf16 / fp16 (float32 raises ValueError: the Triton kernel computes it); A, B,
C, D, bias any float (read as float32); the channels of a group (D / G) a multiple of 64.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from linear_jax.kernels.configs import HopperSelectiveConfig
from linear_jax.kernels.gpu.hopper.common import (
    Ops,
    check_smem,
    f32,
    interpreting,
    launch,
    pl,
    plgpu,
)
from linear_jax.ops.common.chunking import pad_to, resets

BD = 64        # channels per warpgroup: the rows of one accumulator tile


def accepts(u, delta, A, B, C, *rest) -> str | None:
    """Whether the Hopper kernel takes these inputs (None) or why not."""
    dt = jnp.result_type(u)
    if dt not in (jnp.bfloat16, jnp.float16):
        return (f"the Mosaic GPU selective scan takes bfloat16 or float16 u, got {dt}; float32 "
                f"runs on impl='pallas:triton' or impl='chunk'")
    D = u.shape[-1]
    G = 1 if B.ndim == 3 else B.shape[2]
    if (D // G) % BD:
        return (f"the Mosaic GPU selective scan takes channels per group (D / G = {D // G}) in "
                f"multiples of {BD}; use impl='pallas:triton'")
    return None


def _rows_to_tile(ops, ref, Np):
    """A [64, Np] accumulator tile from ref [Np, 64] float32 (row n = state entry n)."""
    c = ops.iota((BD, Np), 1)
    tile = ops.zeros((BD, Np))
    for n in range(Np):
        tile = jnp.where(c == n, ops.rows_of(ops.row(ref.at[n][...]), (BD, Np)), tile)
    return tile


def _tile_to_rows(ops, tile, ref, Np):
    """The transpose of `_rows_to_tile`: ref[n] = tile[:, n]."""
    c = ops.iota((BD, Np), 1)
    for n in range(Np):
        ref[n] = jnp.sum(jnp.where(c == n, tile, 0.0), axis=1)


def _softplus(x):
    return jnp.where(x > 20.0, x, jnp.log(1.0 + jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


class _Step:
    """One step's per-channel rows and the decay, shared by the forward and the backward."""

    def __init__(self, ops, rows, t, consts, Np, softplus, has_keep, bs, cs, ks):
        self.dl = ops.row(rows["delta"].at[t][...]) + consts["bias"]
        self.dt = _softplus(self.dl) if softplus else self.dl
        self.u = ops.row(rows["u"].at[t][...])
        self.z = ops.row(rows["z"].at[t][...]) if "z" in rows else None
        shape = (BD, Np)
        self.a = jnp.exp(consts["A"] * ops.rows_of(self.dt, shape))
        if has_keep:
            self.a = self.a * ops.cols_of(ops.col(ks.at[t][...]), shape)
        self.B = ops.cols_of(ops.col(bs.at[t][...]), shape)
        self.C = ops.cols_of(ops.col(cs.at[t][...]), shape)
        self.inp = ops.rows_of(self.dt * self.u, shape) * self.B


def _setup(ops, cst, Np):
    c = ops.iota((BD, Np), 1)
    A = ops.zeros((BD, Np))
    for n in range(Np):
        A = jnp.where(c == n, ops.rows_of(ops.row(cst.at[n][...]), (BD, Np)), A)
    return {"A": A, "D": ops.row(cst.at[Np][...]), "bias": ops.row(cst.at[Np + 1][...])}


def _grid(u, Bm, cfg, width=BD):
    """(Bsz, Tp, Dp, Np, Ct, NC, NB, per_group, stages, ops) of the forward and backward walks on
    the grid (B, Dp / width): NC chunks of Ct steps, NB channel blocks of `width`, per_group of
    them a group of B and C."""
    Bsz, Tp, Dp = u.shape
    G, Np = Bm.shape[2:]
    Ct = cfg.chunk
    NC, NB = Tp // Ct, Dp // width
    per_group = NB // G
    stages = min(cfg.stages, NC)
    return Bsz, Tp, Dp, Np, Ct, NC, NB, per_group, stages, Ops(interpreting(cfg))


def _block(per_group, width=BD):
    """(b, channel block j, its columns, its group of B and C) of this program."""
    b, j = (jax.lax.axis_index(a) for a in ("b", "d"))
    dsl = pl.ds(j * width, width)
    return b, j, dsl, j // per_group


def _issue_chunk(bar, slot, b, t, dsl, g, rows, bc, keep):
    """The TMA copies of one chunk (rows t) into `slot`, on `bar`: each (ref, ring) of `rows` (the
    block's channels), of `bc` (B and C, the group's) and `keep` (None or (ref, ring))."""
    for ref, ring in rows:
        plgpu.copy_gmem_to_smem(ref.at[b, t, dsl], ring.at[slot], bar)
    for ref, ring in bc:
        plgpu.copy_gmem_to_smem(ref.at[b, t, g], ring.at[slot], bar)
    if keep is not None:
        plgpu.copy_gmem_to_smem(keep[0].at[b, t], keep[1].at[slot], bar)


def _start(issue, stages, cst_ref, cst, dsl, own_bar):
    """Issues the first `stages` chunks, then loads the block's constants and waits for them."""
    for s in range(stages):
        issue(s, s)
    plgpu.copy_gmem_to_smem(cst_ref.at[:, dsl], cst, own_bar.at[0])
    plgpu.barrier_wait(own_bar.at[0])


def _forward_io(u, dl, z, consts, Bm, Cm, keep, h0, *, NC, save):
    """The two forwards' kernel arguments (the absent optional inputs left out) and output types
    (y, hT and with `save` the states entering every chunk)."""
    Bsz, Tp, Dp = u.shape
    Np = Bm.shape[-1]
    args = [u, dl] + ([z] if z is not None else []) + [consts, Bm, Cm] + \
        ([keep] if keep is not None else []) + ([h0] if h0 is not None else [])
    out_type = [jax.ShapeDtypeStruct((Bsz, Tp, Dp), u.dtype),
                jax.ShapeDtypeStruct((Bsz, Np, Dp), f32)]
    out_type += [jax.ShapeDtypeStruct((Bsz, NC, Np, Dp), f32)] if save else []
    return args, out_type


def _forward_refs(refs, names, *, has_keep, has_h0, save):
    """The two forwards' leading refs, popped from `refs` in `_forward_io`'s order and then the
    row slots and B, C, keep rings: (in_refs, (cst, B, C, keep, h0), (y, hT, states), slots,
    (bs, cs, ks)); the kernel's own scratch stays in `refs`."""
    pop = lambda on=True: refs.pop(0) if on else None        # noqa: E731
    in_refs = {n: pop() for n in names}
    consts = pop(), pop(), pop(), pop(has_keep), pop(has_h0)
    outs = pop(), pop(), pop(save)
    slots = {n: pop() for n in names}
    return in_refs, consts, outs, slots, (pop(), pop(), pop(has_keep))


def _backward_refs(refs, names, grads, *, has_keep, has_dhT, outs):
    """The two backwards' leading refs, popped from `refs` in their call's order: (in_refs,
    (cst, B, C, keep, states, dhT), d_refs, the `outs` further outputs, slots, (bs, cs, ks, hs));
    the kernel's own scratch stays in `refs`."""
    pop = lambda on=True: refs.pop(0) if on else None        # noqa: E731
    in_refs = {n: pop() for n in names}
    consts = pop(), pop(), pop(), pop(has_keep), pop(), pop(has_dhT)
    d_refs = {n: pop() for n in grads}
    rest = tuple(pop() for _ in range(outs))
    slots = {n: pop() for n in names}
    return in_refs, consts, d_refs, rest, slots, (pop(), pop(), pop(has_keep), pop())


def _forward_kernel(body, own, *, cfg, ops, args, out_type, names, stages, Np, has_keep, grid,
                    width, name, save):
    """Launches a forward `body` on `_forward_io`'s args and out_type and returns (y, hT, states
    or None): its scratch is the rings of `_forward_refs`' slots (the rows `names`, the first
    args) and B, C, keep, then `own` (the body's own tiles), then the constants [Np + 2, width],
    the state rows [Np, width] and the ring's and the constants' barriers."""
    Ct = cfg.chunk
    scratch = [plgpu.SMEM((stages, Ct, width), x.dtype) for x in args[:len(names)]]
    scratch += [plgpu.SMEM((stages, Ct, Np), f32)] * (2 + has_keep)
    scratch += own + [plgpu.SMEM((Np + 2, width), f32), plgpu.SMEM((Np, width), f32),
                      plgpu.Barrier(num_arrivals=len(names) + 2 + has_keep,
                                    num_barriers=stages),
                      plgpu.Barrier(num_arrivals=1, num_barriers=1)]
    kernel = launch(body, cfg, ops, out_type=out_type, grid=grid, grid_names=("b", "d"),
                    scratch=scratch, name=name)
    outs = list(kernel(*args))
    return outs[0], outs[1], (outs[2] if save else None)


def _forward(u, dl, z, consts, Bm, Cm, keep, h0, *, softplus, cfg, save):
    """u, dl, z [B, Tp, Dp] (z None); consts [Np + 2, Dp] f32 (A^T, D, bias); Bm, Cm [B, Tp, G, Np]
    f32; keep None or [B, Tp, Np] f32; h0 None or [B, Np, Dp] f32. Returns (y [B, Tp, Dp],
    hT [B, Np, Dp] f32, states [B, Tp / C, Np, Dp] f32 or None)."""
    Bsz, Tp, Dp, Np, Ct, NC, NB, per_group, stages, ops = _grid(u, Bm, cfg)
    dt_ = u.dtype
    has_z, has_keep, has_h0 = z is not None, keep is not None, h0 is not None
    names = ("u", "delta") + (("z",) if has_z else ())

    def body(*refs):
        refs = list(refs)
        in_refs, (cst_ref, b_ref, c_ref, k_ref, h0_ref), (y_ref, hT_ref, st_ref), slots, \
            (bs, cs, ks) = _forward_refs(refs, names, has_keep=has_keep, has_h0=has_h0, save=save)
        wide = {n: refs.pop(0) for n in names}
        ys, yo, cst, hst, in_bar, own_bar = refs
        b, j, dsl, g = _block(per_group)
        rows = [(in_refs[n], slots[n]) for n in names]
        bc, keep_ = ((b_ref, bs), (c_ref, cs)), ((k_ref, ks) if has_keep else None)

        def issue(c, slot):
            t = pl.ds(c * Ct, Ct)
            bar = in_bar.at[slot]
            _issue_chunk(bar, slot, b, t, dsl, g, rows, bc, keep_)

        _start(issue, stages, cst_ref, cst, dsl, own_bar)
        if has_h0:
            plgpu.copy_gmem_to_smem(h0_ref.at[b, :, dsl], hst, own_bar.at[0])
            plgpu.barrier_wait(own_bar.at[0])
        consts_ = _setup(ops, cst, Np)
        h = _rows_to_tile(ops, hst, Np) if has_h0 else ops.zeros((BD, Np))

        def chunk_fn(c, h):
            slot = jax.lax.rem(c, stages)
            plgpu.barrier_wait(in_bar.at[slot])
            for n in names:                       # widen the chunk's rows to float32
                wide[n][...] = slots[n].at[slot][...].astype(f32)
            if save:                              # the state entering the chunk
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                _tile_to_rows(ops, h, hst, Np)
            plgpu.commit_smem()
            if save:
                plgpu.copy_smem_to_gmem(hst, st_ref.at[b, c, :, dsl])
            y_rows = []
            for t in range(Ct):
                s = _Step(ops, wide, t, consts_, Np, softplus, has_keep, bs.at[slot],
                          cs.at[slot], ks.at[slot] if has_keep else None)
                h = s.a * h + s.inp
                y = jnp.sum(h * s.C, axis=1) + consts_["D"] * s.u
                if has_z:
                    y = y * s.z * _sigmoid(s.z)
                y_rows.append(y)
            # Stored after the chunk's steps, not inside them: every ref store lowers between two
            # warpgroup barriers (Pallas' auto barriers), which a store per step put between
            # consecutive steps, so no step overlapped the next (see NOTES_ssm.md, session 18).
            for t in range(Ct):
                ys[t] = y_rows[t]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)      # the last y tile has left
            plgpu.commit_smem()
            yo[...] = ys[...].astype(dt_)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(yo, y_ref.at[b, pl.ds(c * Ct, Ct), dsl])

            @pl.when(c + stages < NC)
            def _():
                issue(c + stages, slot)           # every read of this slot is complete

            return h

        h = jax.lax.fori_loop(0, NC, chunk_fn, h)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        _tile_to_rows(ops, h, hst, Np)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hst, hT_ref.at[b, :, dsl])
        plgpu.wait_smem_to_gmem(0)

    args, out_type = _forward_io(u, dl, z, consts, Bm, Cm, keep, h0, NC=NC, save=save)
    own = [plgpu.SMEM((Ct, BD), f32) for _ in names]
    own += [plgpu.SMEM((Ct, BD), f32), plgpu.SMEM((Ct, BD), dt_)]
    return _forward_kernel(body, own, cfg=cfg, ops=ops, args=args, out_type=out_type,
                           names=names, stages=stages, Np=Np,
                           has_keep=has_keep, grid=(Bsz, NB), width=BD,
                           name="selective_scan_fwd", save=save)


LANES_D = 128  # threads of the per-thread kernels' warpgroup (one channel each at width 128)
LOG2E, LN2 = math.log2(math.e), math.log(2.0)


@functools.cache
def _group_fn(kind: str, dtype, k: int, Nl: int, r: int):
    """The per-thread (Mosaic GPU) code of `_Lanes` at width 128 / r (r = 2 or 4), where thread i
    owns channel i // r of the block and its states n = (i % r) Nl + k, k < Nl: a [128] vector
    in WG_STRIDED((128,), 1) holds element i in thread i. Kinds: "row" loads ref[i // r] (ref
    [width]), "state" ref[(i % r) Nl + k, i // r] (ref [Np, width]), "scalar" ref[(i % r) Nl + k]
    (ref [Np]); "put_row" stores x into ref[i // r] from the first thread of each group,
    "put_state" into ref[(i % r) Nl + k, i // r]; "total" is the sum of x over the group's r
    threads (log2 r butterfly shuffles: the group is r adjacent lanes of one warp)."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, memref, vector

    layout = plgpu.Layout.WG_STRIDED((LANES_D,), vec_size=1)
    out = plgpu.ShapeDtypeStruct((LANES_D,), dtype, layout=layout)

    def lane():
        idx, i32 = ir.IndexType.get(), ir.IntegerType.get_signless(32)
        t = arith.index_cast(idx, arith.remui(mu.thread_idx(), mu.c(LANES_D, i32)))
        sub = arith.remui(t, mu.c(r, idx))
        row = arith.addi(arith.muli(sub, mu.c(Nl, idx)), mu.c(k, idx))
        return arith.divui(t, mu.c(r, idx)), sub, row

    def wrap(val):                        # the thread's own value as its element
        return mgpu.FragmentedArray.splat(val, (LANES_D,), layout=layout.to_mgpu())

    def unwrap(x):
        return vector.extract(x.registers.flat[0], dynamic_position=[],
                              static_position=ir.DenseI64ArrayAttr.get([0]))

    if kind in ("row", "state", "scalar"):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=out)
        def load(ctx, ref):
            del ctx
            c, _, n = lane()
            return wrap(memref.load(ref, {"row": [c], "state": [n, c], "scalar": [n]}[kind]))
        return load
    if kind == "total":
        @plgpu.inline_mgpu(arg_types=(layout,), return_type=out)
        def total(ctx, x):
            del ctx
            v = unwrap(x)
            for m in range(int(math.log2(r))):
                v = arith.addf(v, mu.shfl_bfly(v, 1 << m))
            return wrap(v)
        return total

    @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()))
    def store(ctx, x, ref):
        del ctx
        c, sub, n = lane()
        if kind == "put_state":
            memref.store(unwrap(x), ref, [n, c])
        else:
            with mu.when(arith.cmpi(arith.CmpIPredicate.eq, sub,
                                    mu.c(0, ir.IndexType.get()))):
                memref.store(unwrap(x), ref, [c])
    return store


class _Lanes:
    """How the per-thread kernels' warpgroup (128 threads, values [128] vectors in
    WG_STRIDED((128,), 1): element i in thread i) maps onto the `width` channels of its block
    (`HopperSelectiveConfig.thread_channels`), r = 128 / width threads a channel:
    width 128 (r = 1): thread i owns channel i and all Np of its states (Nl = Np of them): rows
    load as [128] vectors, B_t[n] and C_t[n] are scalars every thread reads alike, sums over n
    stay inside the thread (`total` is the identity);
    width 64 or 32 (r = 2 or 4): threads r c .. r c + r - 1 share channel c, thread r c + h owns
    its states n = h Nl + k, k < Nl = Np / r: rows and the channel's constants are loaded by
    every thread of the group, B_t[n], C_t[n] by each thread at its own n (r addresses a warp),
    a sum over n is the thread's Nl terms plus the group's others (`total`, log2 r shuffles), a
    row is stored by the group's first thread. Per-thread code (`_group_fn`) on the device; the
    interpreter computes the same values on [128] arrays with element r c + h."""

    def __init__(self, ops, width: int, Np: int):
        self.interpret, self.width, self.Np = ops.interpret, width, Np
        self.r = LANES_D // width
        self.grouped = self.r > 1               # more than one thread a channel
        self.Nl = Np // self.r
        self.vec = (lambda x: x) if ops.interpret else (lambda x: plgpu.layout_cast(
            x, plgpu.Layout.WG_STRIDED((LANES_D,), vec_size=1)))

    def zeros(self):
        return self.vec(jnp.zeros((LANES_D,), f32))

    def _fn(self, kind, dtype, k=0):
        return _group_fn(kind, dtype, k, self.Nl, self.r)

    def _groups(self, parts):
        """Interpreter: the [128] array of element r c + h = parts[h][c]."""
        return jnp.stack(parts, axis=-1).reshape(LANES_D)

    def row(self, ref):
        """ref [width]: the thread's channel's value, float32."""
        if not self.grouped:
            return self.vec(ref[...]).astype(f32)
        if self.interpret:
            return jnp.repeat(ref[...], self.r).astype(f32)
        return self._fn("row", ref.dtype)(ref).astype(f32)

    def state(self, ref, k: int):
        """ref [Np, width]: the thread's k-th state entry of its channel, float32."""
        if not self.grouped:
            return self.row(ref.at[k])
        if self.interpret:
            return self._groups([ref[h * self.Nl + k] for h in range(self.r)]).astype(f32)
        return self._fn("state", ref.dtype, k)(ref).astype(f32)

    def scalar(self, ref, k: int):
        """ref [Np] (B_t, C_t): the entry of the thread's k-th state."""
        if not self.grouped:
            return ref[k]
        if self.interpret:
            return jnp.tile(jnp.stack([ref[h * self.Nl + k] for h in range(self.r)]),
                            self.width)
        return self._fn("scalar", ref.dtype, k)(ref)

    def total(self, x):
        """The sum over the threads of a channel of their partial sums over n."""
        if not self.grouped:
            return x
        if self.interpret:
            return jnp.repeat(jnp.sum(x.reshape(-1, self.r), axis=1), self.r)
        return self._fn("total", x.dtype)(x)

    def put_row(self, ref, x):
        """ref [width] = the channels' values x (the same in every thread of a group)."""
        if not self.grouped:
            ref[...] = x
        elif self.interpret:
            ref[...] = x.reshape(-1, self.r)[:, 0]
        else:
            self._fn("put_row", x.dtype)(x, ref)

    def put_state(self, ref, k: int, x):
        """ref [Np, width]: each thread's k-th state entry x into its place."""
        if not self.grouped:
            ref[k] = x
        elif self.interpret:
            xg = x.reshape(-1, self.r)
            for h in range(self.r):
                ref[h * self.Nl + k] = xg[:, h]
        else:
            self._fn("put_state", x.dtype, k)(x, ref)


def _forward_threads(u, dl, z, consts, Bm, Cm, keep, h0, *, softplus, cfg, save):
    """`_forward` with one channel per thread (`HopperSelectiveConfig.per_thread_forward`): a
    warpgroup for `cfg.thread_channels` channels (`_Lanes`: at 128 a channel's N states are N
    float32 scalars in its thread's registers, B_t and C_t read from SMEM as scalars every thread
    of the warpgroup reads alike; at 64 (32) two (four) threads share a channel, N / 2 (N / 4)
    states each, and C_t . h_t takes one (two) shuffles a step). A step is N / r independent
    exp2 + FMA pairs (r threads a channel) and an
    in-thread sum (`_forward` sums C_t . h_t over the threads sharing a row of its [64, N] tile
    every step). Decays as exp2(dt A log2 e) (one ex2.approx.ftz under approx_math, as
    `_backward_threads`). Rows of u, delta, z load straight from their bf16 tiles, y rows go to
    GMEM from registers. Same arguments, outputs and states layout as `_forward` (so either
    backward reads its states); the channels per group must be a multiple of the width. Grid
    (B, Dp / width): 64 CTAs at B = 4, D = 2048 and width 128 (half of an H100's 132 SMs idle),
    128 at width 64, 256 at width 32."""
    width = cfg.thread_channels
    Bsz, Tp, Dp, Np, Ct, NC, NB, per_group, stages, ops = _grid(u, Bm, cfg, width)
    has_z, has_keep, has_h0 = z is not None, keep is not None, h0 is not None
    names = ("u", "delta") + (("z",) if has_z else ())
    L = _Lanes(ops, width, Np)
    Nl = L.Nl

    def body(*refs):
        refs = list(refs)
        in_refs, (cst_ref, b_ref, c_ref, k_ref, h0_ref), (y_ref, hT_ref, st_ref), slots, \
            (bs, cs, ks) = _forward_refs(refs, names, has_keep=has_keep, has_h0=has_h0, save=save)
        cst, hst, in_bar, own_bar = refs
        b, _, dsl, g = _block(per_group, width)
        rows = [(in_refs[n], slots[n]) for n in names]
        bc, keep_ = ((b_ref, bs), (c_ref, cs)), ((k_ref, ks) if has_keep else None)

        def issue(c, slot):
            _issue_chunk(in_bar.at[slot], slot, b, pl.ds(c * Ct, Ct), dsl, g, rows, bc, keep_)

        _start(issue, stages, cst_ref, cst, dsl, own_bar)
        if has_h0:
            plgpu.copy_gmem_to_smem(h0_ref.at[b, :, dsl], hst, own_bar.at[0])
            plgpu.barrier_wait(own_bar.at[0])
        A2 = [L.state(cst, k) * LOG2E for k in range(Nl)]     # decays as exp2 (one ex2.approx)
        Dv, bias = L.row(cst.at[Np]), L.row(cst.at[Np + 1])
        h = tuple(L.state(hst, k) if has_h0 else L.zeros() for k in range(Nl))

        def chunk_fn(c, h):
            slot = jax.lax.rem(c, stages)
            h = list(h)
            if save:                              # the state entering the chunk
                for k in range(Nl):
                    L.put_state(st_ref.at[b, c, :, dsl], k, h[k])
            plgpu.barrier_wait(in_bar.at[slot])
            y_rows = []
            for t in range(Ct):
                dl_t = L.row(slots["delta"].at[slot, t]) + bias
                dt_t = _softplus(dl_t) if softplus else dl_t
                u_t = L.row(slots["u"].at[slot, t])
                du = dt_t * u_t
                y = None if L.grouped else Dv * u_t
                for k in range(Nl):
                    a = jnp.exp2(dt_t * A2[k])
                    if has_keep:                  # keep_t is the same for every n
                        a = a * ks[slot, t, k]
                    h[k] = a * h[k] + du * L.scalar(bs.at[slot, t], k)
                    hc = h[k] * L.scalar(cs.at[slot, t], k)
                    y = hc if y is None else y + hc
                if L.grouped:
                    y = L.total(y) + Dv * u_t
                if has_z:
                    z_t = L.row(slots["z"].at[slot, t])
                    y = y * z_t * _sigmoid(z_t)
                y_rows.append(y.astype(y_ref.dtype))
            # After the steps, as in `_forward`: a store is fenced by two warpgroup barriers, and
            # one per step serialised the steps.
            for t in range(Ct):
                L.put_row(y_ref.at[b, c * Ct + t, dsl], y_rows[t])
            plgpu.commit_smem()

            @pl.when(c + stages < NC)
            def _():
                issue(c + stages, slot)           # every read of this slot is complete

            return tuple(h)

        h = jax.lax.fori_loop(0, NC, chunk_fn, h)
        for k in range(Nl):
            L.put_state(hT_ref.at[b, :, dsl], k, h[k])

    args, out_type = _forward_io(u, dl, z, consts, Bm, Cm, keep, h0, NC=NC, save=save)
    return _forward_kernel(body, [], cfg=cfg, ops=ops, args=args, out_type=out_type,
                           names=names, stages=stages, Np=Np, has_keep=has_keep, grid=(Bsz, NB),
                           width=width, name="selective_scan_fwd_threads", save=save)


def _backward(u, dl, z, consts, Bm, Cm, keep, states, dy, dhT, *, softplus, cfg):
    """The reverse walk. Returns (du, ddelta, dz (None without z) [B, Tp, Dp] in their inputs'
    dtypes, dB, dC [B, Dp / 64, Tp, Np] f32 per channel block, dh0 [B, Np, Dp] f32, dA^T
    [B, Np, Dp] f32, (dD, dbias) [B, 2, Dp] f32)."""
    Bsz, Tp, Dp, Np, Ct, NC, NB, per_group, stages, ops = _grid(u, Bm, cfg)
    has_z, has_keep, has_dhT = z is not None, keep is not None, dhT is not None
    names = ("u", "delta", "dy") + (("z",) if has_z else ())
    ins = {"u": u, "delta": dl, "dy": dy, "z": z}
    grads = ("u", "delta") + (("z",) if has_z else ())
    shape = (BD, Np)

    def body(*refs):
        refs = list(refs)
        in_refs, consts, d_refs, outs, slots, (bs, cs, ks, hs) = _backward_refs(
            refs, names, grads, has_keep=has_keep, has_dhT=has_dhT, outs=5)
        cst_ref, b_ref, c_ref, k_ref, st_ref, dhT_ref = consts
        dB_ref, dC_ref, dh0_ref, dA_ref, dDb_ref = outs
        wide = {n: refs.pop(0) for n in names}
        dwide = {n: refs.pop(0) for n in grads}
        douts = {n: refs.pop(0) for n in grads}
        dbs, dcs, cst, hst, in_bar, own_bar = refs
        b, j, dsl, g = _block(per_group)
        rows = [(in_refs[n], slots[n]) for n in names]
        bc, keep_ = ((b_ref, bs), (c_ref, cs)), ((k_ref, ks) if has_keep else None)

        def issue(step, slot):
            c = NC - 1 - step
            t = pl.ds(c * Ct, Ct)
            bar = in_bar.at[slot]
            _issue_chunk(bar, slot, b, t, dsl, g, rows, bc, keep_)
            plgpu.copy_gmem_to_smem(st_ref.at[b, c, :, dsl], hs.at[slot], bar)

        _start(issue, stages, cst_ref, cst, dsl, own_bar)
        if has_dhT:
            plgpu.copy_gmem_to_smem(dhT_ref.at[b, :, dsl], hst, own_bar.at[0])
            plgpu.barrier_wait(own_bar.at[0])
        k = _setup(ops, cst, Np)
        lam = _rows_to_tile(ops, hst, Np) if has_dhT else ops.zeros(shape)
        zero_row = ops.row(jnp.zeros((BD,), f32))
        carry = (lam, ops.zeros(shape), zero_row, zero_row)

        def chunk_fn(step, carry):
            lam, dA, dD, dbias = carry
            c = NC - 1 - step
            slot = jax.lax.rem(step, stages)
            plgpu.barrier_wait(in_bar.at[slot])
            for n in names:
                wide[n][...] = slots[n].at[slot][...].astype(f32)
            plgpu.commit_smem()
            sl = dict(bs=bs.at[slot], cs=cs.at[slot], ks=ks.at[slot] if has_keep else None)
            step_at = functools.partial(_Step, ops, wide, consts=k, Np=Np, softplus=softplus,
                                        has_keep=has_keep, **sl)
            h = _rows_to_tile(ops, hs.at[slot], Np)
            prev = []
            for t in range(Ct):                   # the chunk's states, forward
                s = step_at(t)
                prev.append(h)
                h = s.a * h + s.inp
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's tiles have left
            for t in reversed(range(Ct)):
                s = step_at(t)
                ht = s.a * prev[t] + s.inp
                dy_t = ops.row(wide["dy"].at[t][...])
                if has_z:
                    sg = _sigmoid(s.z)
                    ypre = jnp.sum(ht * s.C, axis=1) + k["D"] * s.u
                    dwide["z"][t] = dy_t * ypre * sg * (1.0 + s.z * (1.0 - sg))
                    dy_t = dy_t * s.z * sg
                dyr = ops.rows_of(dy_t, shape)
                gt = dyr * s.C + lam
                dcs[t] = jnp.sum(dyr * ht, axis=0)
                e = gt * s.a * prev[t]
                dtr = ops.rows_of(s.dt, shape)
                dA = dA + e * dtr
                sum_gB = jnp.sum(gt * s.B, axis=1)
                ddt = jnp.sum(e * k["A"], axis=1) + sum_gB * s.u
                dwide["u"][t] = sum_gB * s.dt + k["D"] * dy_t
                dbs[t] = jnp.sum(gt * ops.rows_of(s.dt * s.u, shape), axis=0)
                dD = dD + dy_t * s.u
                ddl = ddt * _sigmoid(s.dl) if softplus else ddt
                dwide["delta"][t] = ddl
                dbias = dbias + ddl
                lam = s.a * gt
            plgpu.commit_smem()
            for n in grads:
                douts[n][...] = dwide[n][...].astype(douts[n].dtype)
            plgpu.commit_smem()
            t = pl.ds(c * Ct, Ct)
            for n in grads:
                plgpu.copy_smem_to_gmem(douts[n], d_refs[n].at[b, t, dsl])
            plgpu.copy_smem_to_gmem(dbs, dB_ref.at[b, j, t])
            plgpu.copy_smem_to_gmem(dcs, dC_ref.at[b, j, t])

            @pl.when(step + stages < NC)
            def _():
                issue(step + stages, slot)

            return lam, dA, dD, dbias

        lam, dA, dD, dbias = jax.lax.fori_loop(0, NC, chunk_fn, carry)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        _tile_to_rows(ops, lam, hst, Np)
        _tile_to_rows(ops, dA, cst, Np)
        cst[Np] = dD
        cst[Np + 1] = dbias
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hst, dh0_ref.at[b, :, dsl])
        plgpu.copy_smem_to_gmem(cst.at[pl.ds(0, Np)], dA_ref.at[b, :, dsl])
        plgpu.copy_smem_to_gmem(cst.at[pl.ds(Np, 2)], dDb_ref.at[b, :, dsl])
        plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct((Bsz, Tp, Dp), ins[n].dtype) for n in grads]
    out_type += [jax.ShapeDtypeStruct((Bsz, NB, Tp, Np), f32)] * 2
    out_type += [jax.ShapeDtypeStruct((Bsz, Np, Dp), f32)] * 2
    out_type += [jax.ShapeDtypeStruct((Bsz, 2, Dp), f32)]
    scratch = [plgpu.SMEM((stages, Ct, BD), ins[n].dtype) for n in names]
    scratch += [plgpu.SMEM((stages, Ct, Np), f32)] * (2 + has_keep)
    scratch += [plgpu.SMEM((stages, Np, BD), f32)]
    scratch += [plgpu.SMEM((Ct, BD), f32) for _ in names]
    scratch += [plgpu.SMEM((Ct, BD), f32) for _ in grads]
    scratch += [plgpu.SMEM((Ct, BD), ins[n].dtype) for n in grads]
    scratch += [plgpu.SMEM((Ct, Np), f32)] * 2
    scratch += [plgpu.SMEM((Np + 2, BD), f32), plgpu.SMEM((Np, BD), f32),
                plgpu.Barrier(num_arrivals=len(names) + 3 + has_keep, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=1)]
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(Bsz, NB), grid_names=("b", "d"),
                    scratch=scratch, name="selective_scan_bwd")
    args = [ins[n] for n in names] + [consts, Bm, Cm] + ([keep] if has_keep else []) + \
        [states] + ([dhT] if has_dhT else [])
    outs = list(kernel(*args))
    d = {n: outs.pop(0) for n in grads}
    return (d["u"], d["delta"], d.get("z"), *outs)


PART_PAD = 8   # floats padding each row of `_backward_threads`' `part` (bank conflicts, below)


def _sub_steps(Np: int) -> int:
    """Steps of `_backward_threads`' sub-chunk: the fewest whose 2 Np dB / dC products a channel
    fill whole 64-row tiles (Np = 16: 2 steps, Np = 8: 4, Np = 32: 1)."""
    return 64 // math.gcd(64, 2 * Np)


def _backward_threads(u, dl, z, consts, Bm, Cm, keep, states, dy, dhT, *, softplus, cfg):
    """`_backward` with one channel per thread (`HopperSelectiveConfig.per_thread_backward`), on
    `_forward_threads`' layout: grid (B, Dp / 128), one warpgroup, thread i owns channel i of its
    block, the channel's N states h, cotangents lam and dA as N float32 scalars in registers, B_t,
    C_t, keep_t read from SMEM as scalars every thread reads alike. A reverse step is N
    independent terms per thread: no cross-thread sum over n. Same arguments and return contract
    as `_backward` (dB, dC per block of `thread_channels`: [B, Dp / width, Tp, Np]).

    Design:
    1. The chunk's states. C steps x N scalars would not fit registers (256 at C = N = 16), so a
       chunk of C steps is split into sub-chunks of S = 64 / gcd(64, 2 Np) steps (2 at N = 16, 4 at
       N = 8): pass 1 walks the chunk forward from its entering state (TMA'd from the forward's
       [B, T / C, N, D] states) and stores the state entering every sub-chunk but the last into
       SMEM `subs` [C / S - 1, Np, 128] float32 (each thread its own column); pass 2 takes the
       sub-chunks last first, recomputes their S states and decays into registers (2 S Np
       scalars: 64 at N = 16) and runs the S reverse steps over them. Two exps per (t, d, n), as
       `_backward`.
    2. dB_t = sum_d g_t dt_t u_t and dC_t = sum_d dy'_t h_t: each thread stores its 2 Np
       products of a step as rows of `part` [2, S 2 Np, 128 + 8] float32 (its own column; the S
       steps of a sub-chunk fill 64-row tiles; the 8 padding floats a row cut the accumulator
       layout's loads from 8 wavefronts to 2); after the sub-chunk one barrier, then every thread
       loads the tile in the accumulator layout (cross-thread), sums its rows (32 in-thread adds
       a row and two shuffles) and stores the 64 sums as one row of `dbcs` [C 2 Np / 64, 64];
       one TMA copy a chunk writes them to a [B, Dp / 128, Tp 2 Np / 64, 64] output (per step dC
       then dB), reshaped to dB, dC outside. `part` is double-buffered, so the one barrier per
       sub-chunk (between its stores and the loads) also orders the next sub-chunk's stores
       after the loads of the one before.
    3. No auto barriers (`launch(no_auto_barriers=True)`): `subs` and `part`'s stores are thread
       private columns; the cross-thread accesses are fenced explicitly: the ring slots and the
       constants are written by TMA and read after their mbarrier waits; `part` is read after a
       `commit_smem` (warpgroup barrier) per sub-chunk; `dbcs` is written after those barriers
       (which follow the wait for the last chunk's copy out of it) and copied out after a
       `commit_smem` at the chunk's end, which also precedes the slot's refill. du, ddelta, dz
       rows and the final dh0, dA, dD, dbias go from registers to GMEM directly, a step's rows
       as soon as they are computed (no barrier around them); dhT is read from GMEM.
    Decays as exp2(dt A log2 e) (one ex2.approx.ftz under approx_math: `jnp.exp` lowers to a
    multiply and a non-ftz ex2 that ptxas wraps in a range test and two multiplies), the
    d(dt) term e A summed with A log2 e and scaled by ln 2 once a step.
    Barriers a chunk: C / S + 1 (9 at C = 16, N = 16), against ~15 a step in `_backward`.
    Registers: A log2 e, lam, dA 48, the sub-chunk's entering states and decays 2 S Np (64 at
    N = 16), the step's scalars; the [64, 128] reduction tile (64 a thread) after the steps.
    ptxas proxy (`tools/ptxas_report.py`, jax 0.10.2): 254, no spills, with z, D, softplus,
    documents, C = 16, N = 16 (the benchmark's case); 255 with 96 B of spills without them.
    SMEM (C = 16, N = 16, 3 stages, bf16 with z): rings 3 x (4 x 4 KB rows + 2 KB B, C + 8 KB
    states) = 78 KB, subs 56 KB, part 68 KB, dbcs 2 KB, constants 9 KB: 213 KB of the 225
    (`check_smem` raises past it: chunk = 32 does not fit at N = 16, subs alone 120 KB).

    thread_channels = 32 (`_Lanes`): as 64 below with four threads a channel, N / 4 states each,
    two shuffles per sum over n.
    thread_channels = 64 (`_Lanes`): the same walk with threads 2c, 2c + 1 on channel c, each
    its N / 2 states (h, lam, dA, A log2 e: 4 x 8 scalars at N = 16), B_t, C_t at its own n;
    the three sums over n a step (C_t . h_t for dz, sum g B, sum e A) finished by a shuffle with
    the pair; `subs` and `part` hold [Np, 64] (each thread its Nl rows of its channel's column:
    thread-private as before; `part`'s stores 2-way bank conflicted, the two threads' rows
    Nl x 72 floats apart), the tiles [64, 64]; du, ddelta, dz, dD, dbias rows stored by the
    pair's even thread. Why pairs and not two warpgroups of 64 channels: Mosaic GPU lays a
    warpgroup's per-thread vector over all 128 threads (WG_STRIDED((128,), 1)), so 64 channels
    a warpgroup means two threads a channel; the pair sits in one warp, so its combine is one
    `shfl.bfly` (`inline_mgpu`), not an SMEM exchange between warps. S stays 64 / gcd(64, 2 Np)
    (2 at N = 16, 9 barriers a chunk): at S = 4 the proxy spilled 52 B. Proxy (case 3 of the
    export tests with chunk 16, stages 3, both per-thread kernels): 255 registers, no spills,
    4954 SASS instructions a chunk of 16 steps for 64 channels (8130 for 128 at width 128);
    without the extras (case 4) 255, no spills. SMEM 116 KB (rings 45 KB, subs 28 KB, part
    36 KB): one CTA an SM (128 CTAs at the anchor fit 132 SMs anyway)."""
    width = cfg.thread_channels
    Bsz, Tp, Dp, Np, Ct, NC, NB, per_group, stages, ops = _grid(u, Bm, cfg, width)
    has_z, has_keep, has_dhT = z is not None, keep is not None, dhT is not None
    names = ("u", "delta", "dy") + (("z",) if has_z else ())
    ins = {"u": u, "delta": dl, "dy": dy, "z": z}
    grads = ("u", "delta") + (("z",) if has_z else ())
    L = _Lanes(ops, width, Np)
    Nl = L.Nl
    S = _sub_steps(Np)
    nsub, P = Ct // S, 2 * Np * S                # sub-chunks a chunk, products a sub-chunk
    tiles = P // 64
    tile_of = (lambda ref: ref[...]) if ops.interpret else (
        lambda ref: plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=False))

    def body(*refs):
        refs = list(refs)
        in_refs, consts, d_refs, outs, slots, (bs, cs, ks, hs) = _backward_refs(
            refs, names, grads, has_keep=has_keep, has_dhT=has_dhT, outs=4)
        cst_ref, b_ref, c_ref, k_ref, st_ref, dhT_ref = consts
        dbc_ref, dh0_ref, dA_ref, dDb_ref = outs
        subs, part, dbcs, cst, in_bar, own_bar = refs
        b, j, dsl, g = _block(per_group, width)
        rows = [(in_refs[n], slots[n]) for n in names]
        bc, keep_ = ((b_ref, bs), (c_ref, cs)), ((k_ref, ks) if has_keep else None)

        def issue(step, slot):
            c = NC - 1 - step
            bar = in_bar.at[slot]
            _issue_chunk(bar, slot, b, pl.ds(c * Ct, Ct), dsl, g, rows, bc, keep_)
            plgpu.copy_gmem_to_smem(st_ref.at[b, c, :, dsl], hs.at[slot], bar)

        _start(issue, stages, cst_ref, cst, dsl, own_bar)
        row = L.row
        A2 = [L.state(cst, k) * LOG2E for k in range(Nl)]    # decays as exp2 (one ex2.approx)
        Dv, bias = row(cst.at[Np]), row(cst.at[Np + 1])
        zero = L.zeros()
        lam = tuple(L.state(dhT_ref.at[b, :, dsl], k) if has_dhT else zero
                    for k in range(Nl))                                        # from GMEM
        carry = (lam, (zero,) * Nl, zero, zero)

        def chunk_fn(step, carry):
            lam, dA, dD, dbias = (list(x) if isinstance(x, tuple) else x for x in carry)
            c = NC - 1 - step
            slot = jax.lax.rem(step, stages)
            sl = {n: slots[n].at[slot] for n in names}
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last chunk's dbcs has left
            plgpu.barrier_wait(in_bar.at[slot])

            def inputs(t):
                dl_t = row(sl["delta"].at[t]) + bias
                dt_t = _softplus(dl_t) if softplus else dl_t
                u_t = row(sl["u"].at[t])
                dec = []
                for k in range(Nl):
                    a = jnp.exp2(dt_t * A2[k])
                    dec.append(a * ks[slot, t, k] if has_keep else a)    # keep_t alike over n
                return dl_t, dt_t, u_t, dec

            def advance(h, t, dt_t, u_t, dec):
                du_t = dt_t * u_t
                return [dec[k] * h[k] + du_t * L.scalar(bs.at[slot, t], k) for k in range(Nl)]

            # Pass 1: the state entering every sub-chunk (the last one's stays in registers).
            h = [L.state(hs.at[slot], k) for k in range(Nl)]
            for s in range(nsub - 1):
                for k in range(Nl):
                    L.put_state(subs.at[s], k, h[k])
                for r in range(S):
                    t = s * S + r
                    _, dt_t, u_t, dec = inputs(t)
                    h = advance(h, t, dt_t, u_t, dec)
            # Pass 2: per sub-chunk, last first, its states into registers, then its reverse steps.
            for s in reversed(range(nsub)):
                if s < nsub - 1:
                    h = [L.state(subs.at[s], k) for k in range(Nl)]
                hist = []
                for r in range(S):
                    t = s * S + r
                    x = inputs(t)
                    hist.append((h, *x))
                    if r + 1 < S:
                        h = advance(h, t, *x[1:])
                pbuf = part.at[s % 2]
                for r in reversed(range(S)):
                    t = s * S + r
                    hp, dl_t, dt_t, u_t, dec = hist[r]
                    hist[r] = None
                    du_t = dt_t * u_t
                    dech = [dec[k] * hp[k] for k in range(Nl)]     # hp is dead after this
                    Bt = [L.scalar(bs.at[slot, t], k) for k in range(Nl)]
                    Cv = [L.scalar(cs.at[slot, t], k) for k in range(Nl)]
                    ht = lambda k: dech[k] + du_t * Bt[k]      # noqa: E731, B023
                    dy_t = row(sl["dy"].at[t])
                    tg = c * Ct + t
                    out = lambda n, x: L.put_row(                       # noqa: E731, B023
                        d_refs[n].at[b, tg, dsl], x.astype(d_refs[n].dtype))
                    if has_z:
                        z_t = row(sl["z"].at[t])
                        ypre = None if L.grouped else Dv * u_t
                        for k in range(Nl):
                            hc = ht(k) * Cv[k]
                            ypre = hc if ypre is None else ypre + hc
                        if L.grouped:
                            ypre = L.total(ypre) + Dv * u_t
                        sg = _sigmoid(z_t)
                        out("z", dy_t * ypre * sg * (1.0 + z_t * (1.0 - sg)))
                        dy_t = dy_t * z_t * sg
                    sum_gB, ddt = zero, zero
                    pC = pbuf.at[pl.ds(r * 2 * Np, Np), pl.ds(0, width)]
                    pB = pbuf.at[pl.ds(r * 2 * Np + Np, Np), pl.ds(0, width)]
                    for k in range(Nl):
                        gt = dy_t * Cv[k] + lam[k]
                        L.put_state(pC, k, dy_t * ht(k))     # dC_t[n]'s term
                        L.put_state(pB, k, gt * du_t)        # dB_t[n]'s term
                        e = gt * dech[k]
                        dA[k] = dA[k] + e * dt_t
                        ddt = ddt + e * A2[k]                 # times ln 2 below
                        sum_gB = sum_gB + gt * Bt[k]
                        lam[k] = dec[k] * gt
                    sum_gB = L.total(sum_gB)
                    ddt = L.total(ddt) * LN2 + sum_gB * u_t
                    out("u", sum_gB * dt_t + Dv * dy_t)
                    ddl = ddt * _sigmoid(dl_t) if softplus else ddt
                    out("delta", ddl)
                    dD = dD + dy_t * u_t
                    dbias = dbias + ddl
                plgpu.commit_smem()               # every column of pbuf is stored
                for i in range(tiles):            # the sums over the block's channels
                    tile = tile_of(pbuf.at[pl.ds(64 * i, 64), pl.ds(0, width)])
                    dbcs[s * tiles + i] = jnp.sum(tile, axis=1)
            plgpu.commit_smem()                   # dbcs complete; every read of this slot done
            plgpu.copy_smem_to_gmem(dbcs, dbc_ref.at[b, j, pl.ds(c * nsub * tiles, nsub * tiles)])

            @pl.when(step + stages < NC)
            def _():
                issue(step + stages, slot)

            return tuple(lam), tuple(dA), dD, dbias

        lam, dA, dD, dbias = jax.lax.fori_loop(0, NC, chunk_fn, carry)
        for k in range(Nl):
            L.put_state(dh0_ref.at[b, :, dsl], k, lam[k])
            L.put_state(dA_ref.at[b, :, dsl], k, dA[k])
        L.put_row(dDb_ref.at[b, 0, dsl], dD)
        L.put_row(dDb_ref.at[b, 1, dsl], dbias)
        plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct((Bsz, Tp, Dp), ins[n].dtype) for n in grads]
    out_type += [jax.ShapeDtypeStruct((Bsz, NB, Tp * 2 * Np // 64, 64), f32)]
    out_type += [jax.ShapeDtypeStruct((Bsz, Np, Dp), f32)] * 2
    out_type += [jax.ShapeDtypeStruct((Bsz, 2, Dp), f32)]
    scratch = [plgpu.SMEM((stages, Ct, width), ins[n].dtype) for n in names]
    scratch += [plgpu.SMEM((stages, Ct, Np), f32)] * (2 + has_keep)
    scratch += [plgpu.SMEM((stages, Np, width), f32)]
    scratch += [plgpu.SMEM((max(nsub - 1, 1), Np, width), f32),
                plgpu.SMEM((2, P, width + PART_PAD), f32),
                plgpu.SMEM((nsub * tiles, 64), f32),
                plgpu.SMEM((Np + 2, width), f32),
                plgpu.Barrier(num_arrivals=len(names) + 3 + has_keep, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=1)]
    check_smem("selective_scan per-thread backward", scratch,
               "lower HopperSelectiveConfig.stages or chunk")
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(Bsz, NB), grid_names=("b", "d"),
                    scratch=scratch, name="selective_scan_bwd_threads", no_auto_barriers=True)
    args = [ins[n] for n in names] + [consts, Bm, Cm] + ([keep] if has_keep else []) + \
        [states] + ([dhT] if has_dhT else [])
    outs = list(kernel(*args))
    d = {n: outs.pop(0) for n in grads}
    dbc, dh0, dA, dDb = outs
    dbc = dbc.reshape(Bsz, NB, Tp, 2, Np)
    return (d["u"], d["delta"], d.get("z"), dbc[:, :, :, 1], dbc[:, :, :, 0], dh0, dA, dDb)


@functools.cache
def _core(cfg: HopperSelectiveConfig, softplus: bool, has_z: bool, has_keep: bool,
          has_h0: bool):
    """custom_vjp of (u, delta, z, consts, Bm, Cm, keep, h0) -> (y, hT^T) on padded inputs in
    the kernels' layouts (z, keep, h0 None where absent)."""
    kw = dict(softplus=softplus, cfg=cfg)
    forward = _forward_threads if cfg.per_thread_forward else _forward
    backward = _backward_threads if cfg.per_thread_backward else _backward

    def fwd(u, dl, z, consts, Bm, Cm, keep, h0):
        y, hT, states = forward(u, dl, z, consts, Bm, Cm, keep, h0, save=True, **kw)
        return (y, hT), (u, dl, z, consts, Bm, Cm, keep, states)

    def bwd(res, cts):
        u, dl, z, consts, Bm, Cm, keep, states = res
        dy, dhT = cts
        du, ddl, dz, dB, dC, dh0, dA, dDb = backward(u, dl, z, consts, Bm, Cm, keep, states,
                                                     dy.astype(u.dtype), dhT, **kw)
        G = Bm.shape[2]
        per_group = lambda d: d.reshape(d.shape[0], G, -1, *d.shape[2:]).sum(2)   # noqa: E731
        dB = jnp.moveaxis(per_group(dB), 1, 2)           # [B, Tp, G, Np]
        dC = jnp.moveaxis(per_group(dC), 1, 2)
        dconsts = jnp.concatenate([dA.sum(0), dDb.sum(0)], axis=0)
        return (du, ddl, dz, dconsts, dB, dC, None if keep is None else jnp.zeros_like(keep),
                dh0 if has_h0 else None)

    f = jax.custom_vjp(lambda *a: forward(*a, save=False, **kw)[:2])
    f.defvjp(fwd, bwd)
    return f


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, initial_state,
                   segment_ids, chunk_size, config=None):
    """The op's impl signature (`linear_jax.ops.common.selective.unfused` says it), everything
    fused: the step size (softplus and its bias), the D skip and the z gate run in the kernels.

    u, delta, z [B, T, D] bf16 / fp16; A [D, N]; B, C [B, T, N] or [B, T, G, N]; D, delta_bias
    [D] or None; initial_state [B, D, N] or None; segment_ids [B, T] or None. chunk_size is
    ignored (the kernels' chunk is the config's). Returns (y [B, T, D] in u's dtype, final state
    [B, D, N] float32), differentiable in every float input."""
    cfg = config or HopperSelectiveConfig()
    reason = accepts(u, delta, A, B, C)
    if reason is not None:
        raise ValueError(f"selective_scan: {reason}")
    per_group = u.shape[-1] // (1 if B.ndim == 3 else B.shape[2])
    for flag in ("per_thread_forward", "per_thread_backward"):
        if getattr(cfg, flag) and per_group % cfg.thread_channels:
            raise ValueError(f"selective_scan: HopperSelectiveConfig.{flag} takes channels per "
                             f"group in multiples of thread_channels = {cfg.thread_channels}, "
                             f"got {per_group}")
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    Np = -(-N // 8) * 8
    Ct = cfg.chunk
    Tp = -(-T // Ct) * Ct
    group = lambda M: (M[:, :, None] if M.ndim == 3 else M).astype(f32)        # noqa: E731
    Bg, Cg = group(B), group(C)
    seq = lambda x: pad_to(x, 1, Tp)                                            # noqa: E731
    if Tp != T:
        # The padding steps must leave the state alone (the final state is read after them):
        # u = 0 adds nothing, and their step size must be exactly 0 so that they do not decay
        # it either: softplus(-1e4) is 0 in float32; without softplus the bias goes into delta
        # (float32) so that a zero pad is a zero step.
        if delta_softplus:
            delta = jnp.pad(delta, ((0, 0), (0, Tp - T), (0, 0)), constant_values=-1e4)
        elif delta_bias is not None:
            delta, delta_bias = delta.astype(f32) + delta_bias.astype(f32), None
    Bm = pad_to(seq(Bg), 3, Np)
    Cm = pad_to(seq(Cg), 3, Np)
    zero = jnp.zeros((Dm,), f32)
    consts = jnp.concatenate([
        pad_to(A.astype(f32).T, 0, Np),
        (zero if D is None else D.astype(f32))[None],
        (zero if delta_bias is None else delta_bias.astype(f32))[None]], axis=0)
    keep = None
    if segment_ids is not None:
        k = 1.0 - seq(resets(segment_ids)).astype(f32)
        keep = jnp.broadcast_to(k[..., None], (Bsz, Tp, Np))
    h0 = None if initial_state is None else pad_to(
        jnp.swapaxes(initial_state.astype(f32), 1, 2), 1, Np)
    core = _core(cfg, bool(delta_softplus), z is not None, keep is not None, h0 is not None)
    y, hT = core(seq(u), seq(delta), None if z is None else seq(z), consts, Bm, Cm,
                 keep, h0)
    return y[:, :T], jnp.swapaxes(hT[:, :N], 1, 2)
