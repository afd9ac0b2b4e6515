"""Simple GLA (scalar gate; linear attention with g = None; Mamba-2's SSD) on Hopper: Mosaic GPU
kernels with TMA pipelines, wgmma and warp-specialised warpgroups.

The math (per chunk n of C = 64 rows, q scaled, G the chunk-local cumulative gate, the factors gq,
gk, dec of `common.ChunkGates`, E_ij = scale exp(G_i - G_j) on the causal same-document pairs):

    o      = (q k^T * E) v + diag(gq) q S_n
    S_n+1  = dec_n S_n + k^T diag(gk) v

Stages (HopperChunkConfig selects the variants).
  forward   `walk`: one CTA per (b, h, piece) walks the chunks of its piece in order, the float32
            state on chip; it writes o and, under differentiation, the entering state S_n of every
            chunk (bf16, the very tile its wgmma read). Two-level (`pieces` P > 1, where B H alone
            cannot fill the SMs): first the state pass (`emit="state"`: no q, no o) walks every
            piece from zero and writes its end state E_p and total decay d_p; `piece_states` scans
            the P affine maps S -> d_p S + E_p in float32 (XLA, one small fusion) into each
            piece's entering state; then the output pass walks every piece from it (the piece
            that walks last writes the final state). The algebra of `linear_jax/parallel/affine.py`,
            here inside one device; d_p is exactly 0 where a document starts inside the piece.
  backward  `walk` again, in reverse, on (k, q, do) (two-level likewise, with the maps in reverse
            order): the same program computes
                dv     = (k q^T * E^T) do + diag(gk) k dS_n+1
                dS_n   = dec_n dS_n+1 + q^T diag(gq) do
            (dS carried on chip, dS_N = d final state, dS_0 = d initial state), writing dv and every
            dS_n+1; then `grad`, chunk-parallel (a persistent grid over the chunks):
                dq = (do v^T * E) k + diag(gq) do S_n^T
                dk = (do v^T * E)^T q + diag(gk) v dS_n+1^T
            and the gate terms, each routed to the gates of its span (no difference of two sums,
            so the gate gradient stays exact at strong decay; issue 16):
                dg_s = sum_{i>=s} Qq_i + sum_{j<s} Qk_j + Qd_n + sum_{i>=s>j} (dov^T * qk^T * E)_ij
            with Qq_i = q_i . (gq_i do_i S_n^T), Qk_j = k_j . (gk_j v_j dS_n+1^T) and
            Qd_n = dec_n <S_n, dS_n+1>: a pair (i, j) reaches the gate g_s only when j < s <= i.
  gates     `gates="kernel"`: every kernel forms G, gq, gk, dec from the raw log gates of its chunk
            (masked sums of a [C, C] broadcast, inside the first wgmma's latency); XLA only
            transposes g to head-major. `gates="xla"`: the rows of `common.gate_rows`.

Tiles and warpgroups.
  walk: grid (B, H, P); V/64 compute warpgroups, each owning 64 value columns of the state
        (S[:, cols] float32 [K, 64] in registers, as K/64 accumulator blocks of [64, 64]) and one
        producer warpgroup (40 registers) that streams chunk n + stages ahead by TMA into
        `stages` SMEM slots (q, k, v [64, K|V] bf16, swizzled; the gate rows [R, 64] float32),
        released by an mbarrier the consumers arrive on. Per chunk a consumer issues q k^T and
        q S_n together (S_n bf16 in SMEM) and forms the gate factors and E while they run; masks
        and decays A in registers and issues A v (A from registers), scaling o by gq and writing
        v gk to SMEM meanwhile; then issues the state update k^T (v gk), storing o by TMA and
        decaying S meanwhile (`overlap`; each product from zero, the sums added after its
        wait). The state pass keeps only the update (3 stages: its slots hold k, v only).
  grad: grid (#SMs,), persistent; an item is (b, h, chunk) (`item_order`: the head fastest by
        default), one producer warpgroup with a ring of 2 slots of q, k, v, do (64 KB each at
        K = V = 128) and a ring of 2 slots of (S_n, dS_n+1) key tiles [64, V] (32 KB each), so a
        chunk's inputs and intra blocks are loaded and formed once for all its key tiles.
        `grad_items="split"` (default): two compute warpgroups share the item, the dq side (do v^T,
        dA, then per key tile dA k + gq do S_n^T and the sums Qq, Qd) and the dk side (q k^T and
        do v^T again, dA, the intra gate term R_s = sum_{j<s} (W P)_sj with W_si = [i >= s] and
        P = dA * q k^T as bf16 hi, then lo, from SMEM, then per key tile dA^T q + gk v dS_n+1^T
        and the sums Qk); each writes its half of dg [B, H, 2, Tp], its column sums formed by
        routing a row vector through its own SMEM row (no sum over axis 0: two warpgroups would
        race on the CTA's one reduction scratch). 0.20 ms at the T = 2048 anchor on the H200.
        One compute warpgroup running both sides (the form before session 10) took 0.38 ms.
        `grad_items="tile"` (run 1): an item is (b, h, chunk, key tile), q, k, v, do loaded per
        key tile, the prefix sums in XLA.
        No wgmma takes an iota-made 0/1 matrix from registers: on the H200 that operand is wrong
        in rows 8-15 of each warp's 16 (session 10, also the gla fault); such matrices go
        through SMEM.

Roofline at the anchor shapes (bf16, H = 16, K = V = 128, B T = 16384; H200 ~4.3 TB/s, ~790 TFLOP/s
bf16). One [B, T, H, 128] bf16 tensor is 67 MB; a chunk's state [128, 128] bf16 is 32 KB (twice
its q): the states are the traffic to watch.
  forward           reads q, k, v (201 MB), writes o (67 MB)                   268 MB  0.062 ms
                    FLOPs 2 C^2 (K + V) + 4 C K V per chunk-head: 26 GFLOP     0.033 ms
                    but a walk is sequential: per chunk a CTA runs ~7 MFLOP (q k^T is formed by
                    both warpgroups) at ~7.5 TFLOP/s per SM, ~1 us of tensor time, plus the
                    masks and exponentials: N chunks of one (b, h) take N times that, so
                    T = 32768 (512 chunks, B H = 16) needs the two-level walk (P = 8: 64 chunks
                    per CTA, 128 CTAs); the state pass adds k, v again (134 MB) at ~1/3 the work.
  forward + backward  forward with states (+134 MB), reverse walk (q, k, do in; dv, dS out:
                    402 MB), grad "chunk" (q, k, v, do, S, dS in; dq, dk out: 670 MB;
                    "tile" reads q, k, v, do once per key tile: 940 MB)       1474 MB 0.34 ms

Inputs bf16 / fp16 (fp32 raises ValueError: tf32 would not be exact); K, V <= 128, zero-padded to
64 or 128; T zero-padded to a multiple of 64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.configs import HopperChunkConfig, multiprocessors
from linear_jax.kernels.gpu.hopper.common import (
    LANES,
    ChunkGates,
    Ops,
    check_smem,
    chunk_vjp,
    enter_blocks,
    f32,
    gate_rows,
    interpreting,
    launch_walk,
    load,
    padded_doc,
    padded_inputs,
    piece_states,
    pl,
    plgpu,
    prod,
    raw_gate_rows,
    row_names,
    send_states,
    smem,
    stage_state,
    state_outputs,
    unpadded,
    walk_outputs,
    walk_piece,
    walk_results,
    walk_setup,
)
from linear_jax.kernels.gpu.hopper.decay_grad import gate_grad_tiles, grad
from linear_jax.ops.common.chunking import pad_time

STATE_STAGES = 3        # the state pass holds k, v only: three slots fit at K = V = 128


def walk(x, y, z, rows, s0, *, names, read_row, write_row, reverse, scale, cfg, residuals=False,
         pieces=1, emit="out", final=True):
    """The sequential chunk walk, forward (x = q, y = k, z = v) or reverse (x = k, y = q, z = do).

    out_n = (x y^T * E) z + diag(a) x S_n,  S_n+1 = dec S_n + y^T diag(b) z,  over the chunks in
    order (reverse: from the last), a / b the gate factors named read_row / write_row (without
    gate rows: gq = scale, gk = 1).

    x, y [B, Tp, H, K]; z [B, Tp, H, V]; rows [B, H, R, Tp] float32 or None (named `names`: the
    rows of `raw_gate_rows` when cfg.gates == "kernel", else of `gate_rows`); s0 None (zeros) or
    float32 [B, H, K, V] (pieces == 1) or [B, H, P, K, V] (each piece's entering state). The grid
    is (B, H, pieces): piece p walks chunks [p L, (p + 1) L), L = N / pieces.

    emit "out": returns (out [B, Tp, H, V] in z's dtype, the state after the piece that walks last
    (float32 [B, H, K, V]; None unless `final`), the state each chunk read ([B, H, N, K, V] in z's
    dtype; None unless `residuals`)). emit "state" (x not read, pass None): returns (each piece's
    end state float32 [B, H, P, K, V], each piece's total decay [B, H, P, 1] (None without gate
    rows)).
    """
    out_mode, P = emit == "out", pieces
    B, Tp, H, K, V, C, dt, N, NW, NKB, L, stages = walk_setup(
        y, z, cfg, P, None if out_mode else STATE_STAGES)
    ops = Ops(interpreting(cfg), overlap=cfg.overlap)
    has_rows, has_s0 = rows is not None, s0 is not None
    track = has_rows and not out_mode           # the state pass writes each piece's decay
    raw = cfg.gates == "kernel"
    raw_g = raw and "g" in names
    consts = {"gq": scale, "gk": 1.0}
    if has_s0 and s0.ndim == 4:
        s0 = s0[:, :, None]

    def body(*refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None       # noqa: E731
        x_ref, y_ref, z_ref, g_ref, s0_ref = (pop(out_mode), pop(), pop(), pop(has_rows),
                                              pop(has_s0))
        if out_mode:
            out_ref, send_ref, states_ref, dp_ref = pop(), pop(final), pop(residuals), None
        else:
            out_ref, send_ref, states_ref, dp_ref = None, pop(), None, pop(track)
        xs, ys, zs, gs = pop(out_mode), pop(), pop(), pop(has_rows)
        st, os_, ws, fs, dps = pop(out_mode), pop(out_mode), pop(), pop(), pop(track)
        tmps = pop(raw_g)
        in_bar, used_bar, own_bar = refs
        b, h, p, w, chunk, ends = walk_piece(P, L, reverse)

        def issue(step, slot):
            t = pl.ds(chunk(step) * C, C)
            bar = in_bar.at[slot]
            if out_mode:
                plgpu.copy_gmem_to_smem(x_ref.at[b, t, h], xs.at[slot], bar)
            load(bar, slot, (y_ref.at[b, t, h], ys), (z_ref.at[b, t, h], zs))
            if has_rows:
                plgpu.copy_gmem_to_smem(g_ref.at[b, h, :, t], gs.at[slot], bar)

        @ops.walk_warpgroups(w, NW, (issue, L, stages, used_bar), w, NKB)
        def _consumer(vc, kblk):
            fw, ww = fs.at[w], ws.at[w]
            sw, ow = (st.at[w], os_.at[w]) if out_mode else (None, None)
            s0_at = (lambda kr: s0_ref.at[b, h, p, kr, vc]) if has_s0 else None
            S = enter_blocks(ops, s0_at, kblk, fw, own_bar.at[w], sw, dt)
            carry = tuple(S) + ((ops.row(jnp.ones((C,), f32)),) if track else ())

            def factors(slot):
                """The chunk's E and row factors (arrays only: constants stay outside)."""
                gt = ChunkGates(ops, gs.at[slot] if has_rows else None, names, C, scale=scale,
                                raw=raw, tmp=tmps.at[w] if raw_g else None)
                vals = {"E": gt.E(reverse=reverse)} if out_mode else {}
                if has_rows:
                    vals.update(a=gt.factor(read_row), b=gt.factor(write_row), dec=gt.dec)
                return vals

            def step_fn(step, carry):
                S = list(carry[:NKB])

                def write_v(f):                           # gk-scaled z into ww for the update
                    zb = ops.acc(zv.at[:, vc][...]).astype(f32)
                    zb = zb * (ops.rows_of(f["b"], (C, LANES)) if has_rows else
                               consts[write_row])
                    ww[...] = zb.astype(dt)
                    plgpu.commit_smem()

                def decay_state(f):                       # dec is the same on every row
                    if has_rows:
                        return [s * ops.rows_of(f["dec"], (LANES, LANES)) for s in S]

                n, slot = chunk(step), lax.rem(step, stages)
                yk, zv = ys.at[slot], zs.at[slot]
                plgpu.barrier_wait(in_bar.at[slot])
                if out_mode:
                    t, xq = pl.ds(n * C, C), xs.at[slot]
                    if residuals:                         # S_n, as this chunk reads it
                        plgpu.copy_smem_to_gmem(sw, states_ref.at[b, h, n, :, vc])
                    (A, o), f = ops.mm(prod(xq, yk, tb=True), prod(xq, sw),
                                       during=functools.partial(factors, slot))
                    A = A * f["E"]

                    def scale_o_and_v():                  # while A v runs
                        write_v(f)
                        return o * (ops.rows_of(f["a"], (C, LANES)) if has_rows else
                                    consts[read_row])

                    (o_intra,), o = ops.mm(prod(A.astype(dt), zv.at[:, vc]), during=scale_o_and_v)
                    o = o + o_intra

                    def store_o():                        # while the state update runs
                        plgpu.wait_smem_to_gmem(1 if residuals else 0, wait_read_only=True)
                        ow[...] = o.astype(dt)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(ow, out_ref.at[b, t, h, vc])
                        return decay_state(f)
                else:
                    f = factors(slot)
                    write_v(f)
                    store_o = functools.partial(decay_state, f)
                U, decayed = ops.mm(*[prod(yk.at[:, kr], ww, ta=True) for kr in kblk],
                                    during=store_o)
                S = [s + u for s, u in zip(decayed or S, U, strict=True)]
                plgpu.barrier_arrive(used_bar.at[slot])   # every read of this slot is complete
                if out_mode:
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the state store has read st
                    stage_state(S, sw, kblk)
                return tuple(S) + ((carry[NKB] * f["dec"],) if track else ())

            carry = lax.fori_loop(0, L, step_fn, carry)
            send_states(carry, kblk, fw, (b, h, p, w, vc), send_ref,
                        (dps, dp_ref) if track else None, out_mode=out_mode, final=final, ends=ends)

    out_type = (walk_outputs(B, Tp, H, K, V, N, dt, final=final, residuals=residuals) if out_mode
                else state_outputs(B, H, P, K, V, (1, C) if track else None))
    scratch = [smem((stages, C, K), dt)] * (2 if out_mode else 1) + [smem((stages, C, V), dt)]
    if has_rows:
        scratch.append(plgpu.SMEM((stages, rows.shape[2], C), f32))
    if out_mode:
        scratch += [smem((NW, K, LANES), dt), smem((NW, C, LANES), dt)]
    scratch += [smem((NW, C, LANES), dt), smem((NW, LANES, LANES), f32)]
    scratch += [plgpu.SMEM((1, C), f32)] if track else []
    scratch += [plgpu.SMEM((NW, C), f32)] if raw_g else []     # each warpgroup's ChunkGates tmp
    check_smem("simple_gla walk", scratch)
    kernel = launch_walk(body, cfg, ops, out_type=out_type, scratch=scratch, cells=(B, H, P, NW),
                         consumers=NW, copies=2 + out_mode + has_rows, stages=stages,
                         name="simple_gla_walk", reverse=reverse, out=out_mode)
    args = ((x,) if out_mode else ()) + (y, z) + ((rows,) if has_rows else ()) + \
        ((s0,) if has_s0 else ())
    return walk_results(kernel(*args), out_mode=out_mode, final=final, residuals=residuals)


@functools.cache
def _core(cfg: HopperChunkConfig, scale: float, gated: bool, has_doc: bool, has_h0: bool,
          P: int):
    """custom_vjp of (q, k, v, g, doc, h0) -> (o, S_end) on padded inputs, one static setup
    (g, doc, h0 None where absent)."""
    C = cfg.chunk
    kw = dict(scale=scale, cfg=cfg)

    def rows_of(g, doc, H):
        if cfg.gates == "kernel":
            return raw_gate_rows(g, doc, C=C, H=H)
        return gate_rows(g, doc, scale=scale, C=C, H=H)

    def walk2(x, y, z, rows, names, s0, *, reverse, residuals, final):
        """The walk, two-level when P > 1: (out, S after the last piece, states)."""
        wk = dict(names=names, reverse=reverse, read_row="gk" if reverse else "gq",
                  write_row="gq" if reverse else "gk", **kw)
        if P > 1:
            E, dp = walk(None, y, z, rows, None, pieces=P, emit="state", **wk)
            s0 = piece_states(E, dp, s0, reverse=reverse)
        return walk(x, y, z, rows, s0, residuals=residuals, pieces=P, final=final, **wk)

    def forward(q, k, v, g, doc, h0, residuals):
        rows, names = rows_of(g, doc, q.shape[2])
        o, S, states = walk2(q, k, v, rows, names, h0, reverse=False, residuals=residuals,
                             final=True)
        return (o, S), (q, k, v, rows, states)

    names = (("g",) * gated + ("doc", "din") * has_doc if cfg.gates == "kernel" else
             row_names(gated, has_doc))

    def bwd(res, do, dS):
        q, k, v, rows, states = res
        do = do.astype(v.dtype)
        dv, dh0, dstates = walk2(k, q, do, rows, names, dS, reverse=True, residuals=True,
                                 final=has_h0)
        dq, dk, dg = grad(q, k, v, do, rows, states, dstates, names=names, **kw)
        if gated:
            dg = (gate_grad_tiles(dg, C) if cfg.grad_items == "tile" else
                  jnp.moveaxis(dg.sum(2), 1, 2))
        return dq, dk, dv, dg if gated else None, None, dh0 if has_h0 else None

    return chunk_vjp(forward, bwd)


def simple_gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry (the kernel registry's signature).

    q, k [B, T, H, K] (heads expanded), v [B, T, H, V], bf16 or fp16 (float32: ValueError);
    g None or [B, T, H] log decays <= 0; initial_state None or [B, H, K, V]; segment_ids None or
    [B, T]. K, V <= 128 (zero-padded to 64 or 128), T padded to a multiple of 64 (chunk_size does
    not change the kernels' chunk). Returns (o [B, T, H, V] in v's dtype, S [B, H, K, V] float32),
    differentiable in q, k, v, g and initial_state.
    """
    device = jax.devices()[0]
    cfg = (config or HopperChunkConfig.default(device)).for_chunk(chunk_size)
    B, _, H, _ = q.shape
    Tp, _, qkv, h0 = padded_inputs("simple_gla", q, k, v, initial_state, cfg.chunk)
    gp = None if g is None else pad_time(g.astype(f32), Tp)
    doc = None if segment_ids is None else padded_doc(segment_ids, Tp)
    P = cfg.pieces_for(B * H, Tp // cfg.chunk, multiprocessors(device))
    core = _core(cfg, float(scale), g is not None, segment_ids is not None, h0 is not None, P)
    return unpadded(*core(*qkv, gp, doc, h0), q, v)
