"""Simple GLA (scalar gate; linear attention with g = None; Mamba-2's SSD) on Hopper: Mosaic GPU
kernels with TMA pipelines, wgmma and warp-specialised warpgroups.

The math (per chunk n of C = 64 rows, q scaled, G the chunk-local cumulative gate, the rows gq, gk,
dec of `common.gate_rows`, E_ij = scale exp(G_i - G_j) on the causal same-document pairs):

    o      = (q k^T * E) v + diag(gq) q S_n
    S_n+1  = dec_n S_n + k^T diag(gk) v

Stages.
  forward   `walk`: one CTA per (b, h) walks the chunks in order, the float32 state on chip; it
            writes o and, under differentiation, the entering state S_n of every chunk (bf16, the
            very tile its wgmma read).
  backward  `walk` again, in reverse, on (k, q, do): the same program computes
                dv     = (k q^T * E^T) do + diag(gk) k dS_n+1
                dS_n   = dec_n dS_n+1 + q^T diag(gq) do
            (dS carried on chip, dS_N = d final state, dS_0 = d initial state), writing dv and every
            dS_n+1; then `grad`, chunk-parallel (a persistent grid over (b, h, chunk, key tile)):
                dq = (do v^T * E) k + diag(gq) do S_n^T
                dk = (do v^T * E)^T q + diag(gk) v dS_n+1^T
            and the gate terms, each routed to the gates of its span (no difference of two sums,
            so the gate gradient stays exact at strong decay; issue 16):
                dg_s = sum_{i>=s} Qq_i + sum_{j<s} Qk_j + Qd_n + sum_{i>=s>j} (dov^T * qk^T * E)_ij
            with Qq_i = q_i . (gq_i do_i S_n^T), Qk_j = k_j . (gk_j v_j dS_n+1^T) and
            Qd_n = dec_n <S_n, dS_n+1>: a pair (i, j) reaches the gate g_s only when j < s <= i, so
            the diagonal pairs (no decay) never touch dg. The prefix sums over the chunk run in XLA.

Tiles and warpgroups.
  walk: grid (B, H); V/64 compute warpgroups, each owning 64 value columns of the state
        (S[:, cols] float32 [K, 64] in registers, as K/64 accumulator blocks of [64, 64]) and one
        producer warpgroup (40 registers) that streams chunk n + stages ahead by TMA into
        `stages` SMEM slots (q, k, v [64, K|V] bf16, swizzled; the gate rows [R, 64] float32),
        released by an mbarrier the consumers arrive on. Per chunk a consumer issues q k^T and
        q S_n together (S_n bf16 in SMEM), masks and decays A in registers, o += A v (A from
        registers), stores o by TMA, scales v by gk into SMEM and updates S with k^T (v gk).
  grad: grid (#SMs,), each CTA taking items (b, h, chunk, 64-key tile) in turn: one compute
        warpgroup and one producer (2 slots of q, k, v, do, S_n[tile], dS_n+1[tile]: 97 KB each).
        The intra-gate term uses X = P U (U the strictly upper 0/1 matrix) on wgmma with P split
        into two bf16 halves (hi + lo: ~16 bits), then a masked column sum.

Roofline at the anchor shapes (bf16, H = 16, K = V = 128, B T = 16384; H200 ~4.3 TB/s, ~790 TFLOP/s
bf16). One [B, T, H, 128] bf16 tensor is 67 MB; a chunk's state [128, 128] bf16 is 32 KB (twice
its q): the states are the traffic to watch.
  forward           reads q, k, v (201 MB), writes o (67 MB)                   268 MB  0.062 ms
                    FLOPs 2 C^2 (K + V) + 4 C K V per chunk-head: 26 GFLOP     0.033 ms
  forward + backward  forward with states (+134 MB), reverse walk (q, k, do in; dv, dS out:
                    402 MB), grad (q, k, v, do, S, dS in; dq, dk out: 670 MB)  1474 MB 0.34 ms
  jax-linear-attention: 0.175 / 0.711 ms at T = 2048. The walks are sequential in T: at B H = 16
  (T = 32768) they use 16 CTAs and are latency-bound (the two-level walk of the issue, not yet
  written, is the cure); grad is parallel at every shape.

Inputs bf16 / fp16 (fp32 raises ValueError: tf32 would not be exact); K, V <= 128, zero-padded to
64 or 128; T zero-padded to a multiple of 64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax._compat import mosaic_gpu_kernel
from linear_jax.kernels.configs import HopperChunkConfig, multiprocessors
from linear_jax.kernels.gpu.hopper.common import (
    LANES,
    Ops,
    check_inputs,
    check_smem,
    f32,
    gate_rows,
    interpreting,
    pad_input,
    padded_doc,
    pl,
    plgpu,
    prod,
    smem,
)
from linear_jax.ops.common.chunking import pad_time

PRODUCER_REGS, CONSUMER_REGS = 40, 232


def _gates(ops, gs, names, C, *, reverse: bool, scale: float):
    """E [C, C] (the masked, decayed intra factor) from a chunk's gate rows in SMEM (gs [R, C], or
    None: no gate, no documents); rows are queries for the forward, keys when `reverse`."""
    shape = (C, C)
    r, c = ops.iota(shape, 0), ops.iota(shape, 1)
    mask = (c >= r) if reverse else (r >= c)
    # each vector is loaded twice, once per layout (a register relayout row <-> column does not
    # exist)
    if "doc" in names:
        d = gs.at[names.index("doc")]
        mask = mask & (ops.rows_of(ops.row(d[...]), shape) == ops.cols_of(ops.col(d[...]), shape))
    if "G" in names:
        G = gs.at[names.index("G")]
        Gr, Gc = ops.rows_of(ops.row(G[...]), shape), ops.cols_of(ops.col(G[...]), shape)
        span = (Gc - Gr) if reverse else (Gr - Gc)           # sum of the gates in (j, i]: <= 0
        E = scale * jnp.exp(jnp.minimum(span, 0.0))
    else:
        E = jnp.full(shape, scale, f32)
    return jnp.where(mask, E, 0.0)


def walk(x, y, z, rows, s0, *, names, read_row, write_row, reverse, scale, cfg, residuals):
    """The sequential chunk walk, forward (x = q, y = k, z = v) or reverse (x = k, y = q, z = do).

    out_n = (x y^T * E) z + diag(a) x S_n,  S_n+1 = dec S_n + y^T diag(b) z,  over the chunks in
    order (reverse: from the last), a / b the gate rows named read_row / write_row (without gate
    rows: a = scale, b = 1 forward; a = 1, b = scale in reverse).

    x, y [B, Tp, H, K]; z [B, Tp, H, V]; rows [B, H, R, Tp] float32 or None; s0 [B, H, K, V]
    float32. Returns (out [B, Tp, H, V] in z's dtype, S_end float32) and, with `residuals`, the
    state each chunk read ([B, H, N, K, V] in z's dtype).
    """
    B, Tp, H, K = x.shape
    V, C, dt = z.shape[-1], cfg.chunk, z.dtype
    N, NW, NKB = Tp // C, V // LANES, K // LANES
    stages = min(cfg.stages, N)
    ops = Ops(interpreting(cfg))
    has_rows = rows is not None
    a_const, b_const = (1.0, scale) if reverse else (scale, 1.0)

    def body(*refs):
        x_ref, y_ref, z_ref, *refs = refs
        g_ref = refs.pop(0) if has_rows else None
        s0_ref, out_ref, send_ref, *refs = refs
        states_ref = refs.pop(0) if residuals else None
        xs, ys, zs, *refs = refs
        gs = refs.pop(0) if has_rows else None
        st, os_, ws, fs, in_bar, used_bar, own_bar = refs
        b, h, w = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
        chunk = (lambda s: N - 1 - s) if reverse else (lambda s: s)

        @pl.when(w == NW)
        def _producer():
            ops.registers(PRODUCER_REGS, "decrease")

            def issue(step, slot):
                t = pl.ds(chunk(step) * C, C)
                bar = in_bar.at[slot]
                plgpu.copy_gmem_to_smem(x_ref.at[b, t, h], xs.at[slot], bar)
                plgpu.copy_gmem_to_smem(y_ref.at[b, t, h], ys.at[slot], bar)
                plgpu.copy_gmem_to_smem(z_ref.at[b, t, h], zs.at[slot], bar)
                if has_rows:
                    plgpu.copy_gmem_to_smem(g_ref.at[b, h, :, t], gs.at[slot], bar)

            for s in range(stages):
                issue(s, s)

            @pl.loop(stages, N)
            def _(step):
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(used_bar.at[slot])     # the consumers are done with step - S
                issue(step, slot)

            for s in range(stages):                       # observe the last releases too
                plgpu.barrier_wait(used_bar.at[lax.rem(N - stages + s, stages)])

        @pl.when(w < NW)
        def _consumer():
            ops.registers(CONSUMER_REGS, "increase")
            vc = pl.ds(w * LANES, LANES)
            kblk = [pl.ds(r * LANES, LANES) for r in range(NKB)]
            fw, ow, ww, sw = fs.at[w], os_.at[w], ws.at[w], st.at[w]
            S = []
            for kr in kblk:                               # the initial state, 64 rows at a time
                plgpu.copy_gmem_to_smem(s0_ref.at[b, h, kr, vc], fw, own_bar.at[w])
                plgpu.barrier_wait(own_bar.at[w])
                blk = ops.acc(fw[...])
                S.append(blk)
                sw[kr, :] = blk.astype(dt)
                plgpu.commit_smem()                       # also: fw is read before it is reused

            def step_fn(step, S):
                n, slot = chunk(step), lax.rem(step, stages)
                t = pl.ds(n * C, C)
                xq, yk, zv = xs.at[slot], ys.at[slot], zs.at[slot]
                plgpu.barrier_wait(in_bar.at[slot])
                if residuals:                             # S_n, as this chunk reads it
                    plgpu.copy_smem_to_gmem(sw, states_ref.at[b, h, n, :, vc])
                A, o = ops.mm(prod(xq, yk, tb=True), prod(xq, sw))
                g = gs.at[slot] if has_rows else None
                A = A * _gates(ops, g, names, C, reverse=reverse, scale=scale)
                if has_rows:
                    a = ops.row(g.at[names.index(read_row)][...])
                    bvec = ops.row(g.at[names.index(write_row)][...])
                    dec = g[names.index("dec"), 0]
                    o = o * ops.rows_of(a, (C, LANES))
                else:
                    o = o * a_const
                o = ops.dot(A.astype(dt), zv.at[:, vc], acc=o)
                plgpu.wait_smem_to_gmem(1 if residuals else 0, wait_read_only=True)
                ow[...] = o.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(ow, out_ref.at[b, t, h, vc])
                zb = ops.acc(zv.at[:, vc][...]).astype(f32)
                zb = zb * ops.rows_of(bvec, (C, LANES)) if has_rows else zb * b_const
                ww[...] = zb.astype(dt)
                plgpu.commit_smem()
                S = ops.mm(*[prod(yk.at[:, kr], ww, S[i] * dec if has_rows else S[i], ta=True)
                             for i, kr in enumerate(kblk)])
                plgpu.barrier_arrive(used_bar.at[slot])   # every read of this slot is complete
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the state store has read st
                for i, kr in enumerate(kblk):
                    sw[kr, :] = S[i].astype(dt)
                plgpu.commit_smem()
                return tuple(S)

            S = lax.fori_loop(0, N, step_fn, tuple(S))
            for i, kr in enumerate(kblk):                 # the final state, 64 rows at a time
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                fw[...] = S[i]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(fw, send_ref.at[b, h, kr, vc])
            plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct((B, Tp, H, V), dt), jax.ShapeDtypeStruct((B, H, K, V), f32)]
    if residuals:
        out_type.append(jax.ShapeDtypeStruct((B, H, N, K, V), dt))
    n_copies = 3 + has_rows
    scratch = [smem((stages, C, K), dt), smem((stages, C, K), dt), smem((stages, C, V), dt)]
    if has_rows:
        scratch.append(plgpu.SMEM((stages, rows.shape[2], C), f32))
    scratch += [smem((NW, K, LANES), dt), smem((NW, C, LANES), dt), smem((NW, C, LANES), dt),
                smem((NW, LANES, LANES), f32),
                plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
                plgpu.Barrier(num_arrivals=NW, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=NW)]
    check_smem("simple_gla walk", scratch)
    kernel = mosaic_gpu_kernel(
        body, out_type=out_type, grid=(B, H), grid_names=("b", "h"), num_threads=NW + 1,
        thread_name="wg", scratch_types=scratch, semantics=cfg.semantics,
        approx_math=cfg.approx_math, interpret=ops.interpret,
        name="simple_gla_walk_rev" if reverse else "simple_gla_walk")
    args = (x, y, z) + ((rows,) if has_rows else ()) + (s0,)
    return kernel(*args)


def grad(q, k, v, do, rows, states, dstates, *, names, scale, cfg):
    """dq, dk and the gate terms of every chunk, chunk-parallel.

    q, k [B, Tp, H, K]; v, do [B, Tp, H, V]; rows as `walk`; states / dstates [B, H, N, K, V] the
    S_n and dS_n+1 of each chunk. Returns dq, dk (q's dtype) and stats [K/64, B, H, 4, Tp] float32:
    per key tile the rows Qq, Qk, R (the intra-chunk gate term; the same in every tile) and, in
    each chunk's 64 entries, dec <S_n, dS_n+1> restricted to one state row each.
    """
    B, Tp, H, K = q.shape
    V, C, dt = v.shape[-1], cfg.chunk, q.dtype
    N, NKB = Tp // C, K // LANES
    items = B * H * N * NKB
    progs = min(cfg.grad_programs or multiprocessors(jax.devices()[0]), items)
    stages = cfg.stages_grad
    ops = Ops(interpreting(cfg))
    has_rows, gated = rows is not None, "G" in names

    def decode(item):
        kb, rest = lax.rem(item, NKB), lax.div(item, NKB)
        n, bh = lax.rem(rest, N), lax.div(rest, N)
        return lax.div(bh, H), lax.rem(bh, H), n, kb

    def body(*refs):
        q_ref, k_ref, v_ref, do_ref, *refs = refs
        g_ref = refs.pop(0) if has_rows else None
        s_ref, ds_ref, dq_ref, dk_ref, stats_ref, *refs = refs
        qs, ks, vs, dos, ss, dss, *refs = refs
        gs = refs.pop(0) if has_rows else None
        da_s, oq_s, u_s, sts, in_bar, used_bar = refs
        pid, w = lax.axis_index("p"), lax.axis_index("wg")
        count = lax.div(items - pid + progs - 1, progs)   # items pid, pid + progs, ...

        @pl.when(w == 1)
        def _producer():
            ops.registers(PRODUCER_REGS, "decrease")

            def issue(i, slot):
                b, h, n, kb = decode(pid + i * progs)
                t, kr = pl.ds(n * C, C), pl.ds(kb * LANES, LANES)
                bar = in_bar.at[slot]
                for src, dst in ((q_ref, qs), (k_ref, ks), (v_ref, vs), (do_ref, dos)):
                    plgpu.copy_gmem_to_smem(src.at[b, t, h], dst.at[slot], bar)
                plgpu.copy_gmem_to_smem(s_ref.at[b, h, n, kr], ss.at[slot], bar)
                plgpu.copy_gmem_to_smem(ds_ref.at[b, h, n, kr], dss.at[slot], bar)
                if has_rows:
                    plgpu.copy_gmem_to_smem(g_ref.at[b, h, :, t], gs.at[slot], bar)

            for s in range(stages):
                pl.when(s < count)(functools.partial(issue, s, s))

            @pl.loop(stages, count)
            def _(i):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(used_bar.at[slot])
                issue(i, slot)

            for s in range(stages):                       # observe the last releases too
                pl.when(s < count)(lambda s=s: plgpu.barrier_wait(used_bar.at[s]))

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
                b, h, n, kb = decode(pid + i * progs)
                t, kr = pl.ds(n * C, C), pl.ds(kb * LANES, LANES)
                qq, kk, vv, dd = qs.at[slot], ks.at[slot], vs.at[slot], dos.at[slot]
                g = gs.at[slot] if has_rows else None
                plgpu.barrier_wait(in_bar.at[slot])
                QK, dP = ops.mm(prod(qq, kk, tb=True), prod(dd, vv, tb=True))
                E = _gates(ops, g, names, C, reverse=False, scale=scale)
                dA = dP * E
                if gated:                                 # intra gate term, X = P U
                    Pm = dA * QK
                    hi = Pm.astype(dt)
                    lo = (Pm - hi.astype(f32)).astype(dt)
                    X1, X2 = ops.mm(prod(hi, u_s), prod(lo, u_s))
                    below = ops.iota(shape, 0) >= ops.iota(shape, 1)
                    R = jnp.sum(jnp.where(below, X1 + X2, 0.0), axis=0)   # sum over i >= s
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # last item's stores are out
                da_s[...] = dA.astype(dt)
                plgpu.commit_smem()
                dq, dk, dqi, dki = ops.mm(prod(dA.astype(dt), kk.at[:, kr]),
                                          prod(da_s, qq.at[:, kr], ta=True),
                                          prod(dd, ss.at[slot], tb=True),
                                          prod(vv, dss.at[slot], tb=True))
                if has_rows:
                    gq = ops.rows_of(ops.row(g.at[names.index("gq")][...]), half)
                    gk = ops.rows_of(ops.row(g.at[names.index("gk")][...]), half)
                    dec = g[names.index("dec"), 0]
                    dqi, dki = dqi * gq, dki * gk
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
                plgpu.SMEM((4, C), f32),
                plgpu.Barrier(num_arrivals=6 + has_rows, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, K), dt),
                jax.ShapeDtypeStruct((NKB, B, H, 4, Tp), f32)]
    check_smem("simple_gla grad", scratch)
    kernel = mosaic_gpu_kernel(
        body, out_type=out_type, grid=(progs,), grid_names=("p",), num_threads=2,
        thread_name="wg", scratch_types=scratch, semantics=cfg.semantics,
        approx_math=cfg.approx_math, interpret=ops.interpret, name="simple_gla_grad")
    args = (q, k, v, do) + ((rows,) if has_rows else ()) + (states, dstates)
    return kernel(*args)


def _gate_grad(stats, C):
    """dg [B, Tp, H] from the kernel's per-chunk terms (see the module docstring)."""
    NKB, B, H, _, Tp = stats.shape
    x = stats.reshape(NKB, B, H, 4, Tp // C, C)
    Qq, Qk = x[:, :, :, 0].sum(0), x[:, :, :, 1].sum(0)
    R, Qd = x[0, :, :, 2], x[:, :, :, 3].sum((0, -1))
    after_q = jnp.flip(jnp.cumsum(jnp.flip(Qq, -1), -1), -1)       # sum_{i >= s}
    before_k = jnp.cumsum(Qk, -1)
    before_k = jnp.concatenate([jnp.zeros_like(before_k[..., :1]), before_k[..., :-1]], -1)
    dg = after_q + before_k + Qd[..., None] + R                     # [B, H, N, C]
    return jnp.moveaxis(dg.reshape(B, H, Tp), 1, 2)


@functools.cache
def _core(cfg: HopperChunkConfig, scale: float, gated: bool, has_doc: bool):
    """custom_vjp of (q, k, v, g, doc, h0) -> (o, S_end) on padded inputs, one static setup."""
    C = cfg.chunk
    kw = dict(scale=scale, cfg=cfg)

    def rows_of(g, doc, H):
        return gate_rows(g if gated else None, doc if has_doc else None, scale=scale, C=C, H=H)

    def fwd(q, k, v, g, doc, h0, residuals=True):
        rows, names = rows_of(g, doc, q.shape[2])
        out = walk(q, k, v, rows, h0, names=names, read_row="gq", write_row="gk",
                   reverse=False, residuals=residuals, **kw)
        return (out[0], out[1]), (q, k, v, g, doc, out[2] if residuals else None)

    def bwd(res, cts):
        q, k, v, g, doc, states = res
        do, dS = cts
        do = do.astype(v.dtype)
        rows, names = rows_of(g, doc, q.shape[2])
        dv, dh0, dstates = walk(k, q, do, rows, dS.astype(f32), names=names, read_row="gk",
                                write_row="gq", reverse=True, residuals=True, **kw)
        dq, dk, stats = grad(q, k, v, do, rows, states, dstates, names=names, **kw)
        dg = _gate_grad(stats, C) if gated else jnp.zeros_like(g)
        return dq, dk, dv, dg, None, dh0

    f = jax.custom_vjp(lambda *a: fwd(*a, residuals=False)[0])
    f.defvjp(fwd, bwd)
    return f


def simple_gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry (the kernel registry's signature).

    q, k [B, T, H, K] (heads expanded), v [B, T, H, V], bf16 or fp16 (float32: ValueError);
    g None or [B, T, H] log decays <= 0; initial_state None or [B, H, K, V]; segment_ids None or
    [B, T]. K, V <= 128 (zero-padded to 64 or 128), T padded to a multiple of 64 (chunk_size does
    not change the kernels' chunk). Returns (o [B, T, H, V] in v's dtype, S [B, H, K, V] float32),
    differentiable in q, k, v, g and initial_state.
    """
    cfg = (config or HopperChunkConfig.default(jax.devices()[0])).for_chunk(chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt, Kp, Vp = check_inputs("simple_gla", q, k, v)
    C = cfg.chunk
    Tp = -(-T // C) * C
    gp = (jnp.zeros((B, Tp, H), f32) if g is None else pad_time(g.astype(f32), Tp))
    doc = (jnp.zeros((B, Tp), jnp.int32) if segment_ids is None else padded_doc(segment_ids, Tp))
    h0 = (jnp.zeros((B, H, Kp, Vp), f32) if initial_state is None else
          jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))))
    core = _core(cfg, float(scale), g is not None, segment_ids is not None)
    o, S = core(pad_input(q, Tp, Kp, dt), pad_input(k, Tp, Kp, dt), pad_input(v, Tp, Vp, dt),
                gp, doc, h0)
    return o[:, :T, :, :V].astype(v.dtype), S[:, :, :K, :V]
