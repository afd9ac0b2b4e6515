"""The fused Hopper mLSTM forward (`HopperMlstmConfig.fused_forward`): one Mosaic GPU kernel that
walks the 64-token tiles of a (b, h, value block) in order with the chunk state on chip, so no
chunk-state pass runs in XLA (`mlstm`'s docstring has the math; this is its recurrence with
tiles of C = 64 tokens as the chunks).

Per tile (rows t0 .. t0 + 63), with the entering state (S [K, Vb], n [K]) stabilised by m_prev
(m at token t0 - 1, m0 for the first tile), F the tile-local inclusive sum of l = logsigmoid(f),
R_j = sum_{j < s in the tile} l_s and m_last = m at the tile's last token:

    P_ij  = (q_i . k_j) exp(a_i + b_j)   on the causal same-document pairs (a, b as `mlstm`)
    num_i = sum_j P_ij v_j + w_i q_i S,    den_i = sum_j P_ij + w_i q_i . n
    h_i   = num_i / (max(|den_i|, exp(-m_i)) + eps)
    S'    = dec S + k^T diag(u) v,  n' = dec n + k^T u
    w_i   = s exp(F_i + m_prev - m_i)  (0 on rows cut off from the entering state's document)
    u_j   = exp(i_j + R_j - m_last)    (0 off the tile's last document)
    dec   = exp(F_last + m_prev - m_last)  (0 where a document starts inside the tile)

m is the token stabiliser of `gates.running_max` (XLA), so every exponent is <= 0 and the state
needs no online rescaling: S after tile t is stabilised by m at its last token, exactly the
state `mlstm._states` forms at a chunk boundary (to rounding). The rows a, w, -m, b, u, dec
(and the document index) are formed per tile in XLA (`tile_rows`, [B, H, R, Tp] float32).

Kernel (`fused_forward`): grid (B, H, V / 64), a CTA owns one (b, h) and 64 value columns and
walks all Tp / 64 tiles; two warpgroups: a TMA producer (`common.produce`, 40 registers) filling
a ring of 3 slots (q [64, K], k [64, K], v [64, 64] bf16, the rows [R, 64] f32) and one consumer
holding S [K, 64] float32 as K / 64 accumulator blocks and n as K / 64 column vectors. Per tile:
q k^T (M64 N64 K) and q S (M64 N64 K, S staged as bf16 in SMEM, as the unfused forward's bf16
C_in) issued together; the pair factor, q . n and the row sums in registers; P v (P from
registers) accumulated onto w q S; h staged and stored by TMA; then the update k^T (u v) as two
wgmmas per key block with u v split into bf16 hi + lo (~16 mantissa bits: the final state
matches the float32 recurrence to ~1e-6, where a bf16 u v would be 4e-3 off), n's update as a
float32 column sum. Under differentiation the kernel also writes, at each chunk start of
L = cfg.chunk (every L / 64 tiles), the entering state C_in (bf16, the tile the backward's
wgmma reads) and n_in (float32), and the normaliser den of every row (vc = 0 CTAs only): the
residuals `mlstm_bwd` takes.

SMEM at K = V = 128, bf16, R = 7: ring 3 x (16 + 16 + 8 KB + 1.75 KB) = 125.25 KB; S bf16
[128, 64] 16 KB; u v hi, lo [64, 64] bf16 16 KB; h staging 8 KB; a float32 [64, 64] tile for the
entering / final state 16 KB; n [2, 64] and den [1, 64] float32 0.75 KB: ~182 KB, one CTA an SM
(4 slots would be ~224 KB, past the 225 KB check). At K = V = 64 ~126 KB (the
ring 77 KB).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.gpu.hopper.common import (
    LANES,
    Ops,
    check_smem,
    enter_blocks,
    f32,
    interpreting,
    launch_walk,
    load,
    mm_sum,
    pl,
    plgpu,
    prod,
    smem,
    split_hi_lo,
    stage_state,
    term,
    write_blocks,
)
from linear_jax.kernels.gpu.hopper.mlstm_fwd import pair_factor
from linear_jax.ops.common.gates import rev_cumsum_excl
from linear_jax.ops.common.normalise import MAX_LOG_FLOOR

TROWS = ("a", "w", "negm", "b", "u", "dec", "doc")
STAGES = 3


def tile_rows(lf, ig, m, m0, doc, scale):
    """The fused kernel's rows [B, H, R, Tp] (`TROWS`, doc only with documents) from lf, ig, m
    [B, H, Tp] float32 (m the token stabiliser, padding continuing it), m0 [B, H] and doc
    [B, Tp] float32 or None."""
    B, H, Tp = lf.shape
    C = LANES
    tiles = lambda x: x.reshape(x.shape[:-1] + (Tp // C, C))            # noqa: E731
    lc, ic, mc = tiles(lf), tiles(ig), tiles(m)
    F = jnp.cumsum(lc, -1)
    after = rev_cumsum_excl(lc, -1)
    m_last = mc[..., -1]
    m_prev = jnp.concatenate([m0[..., None], m_last[..., :-1]], -1)
    ex = lambda x: jnp.exp(jnp.minimum(x, 0.0))                         # noqa: E731
    w = scale * ex(F + m_prev[..., None] - mc)
    u = ex(ic + after - m_last[..., None])
    dec = ex(F[..., -1] + m_prev - m_last)
    if doc is not None:
        d = tiles(doc)                                                  # [B, NQ, C]
        d_in = jnp.concatenate([jnp.zeros_like(d[:, :1, :1]), d[:, :-1, -1:]], axis=1)
        w = jnp.where((d == d_in)[:, None], w, 0.0)
        u = jnp.where((d == d[..., -1:])[:, None], u, 0.0)
        dec = jnp.where((d[..., -1] == d_in[..., 0])[:, None], dec, 0.0)
    rows = [F - mc + math.log(scale), w, -mc, ic - F, u, jnp.broadcast_to(dec[..., None], F.shape)]
    if doc is not None:
        rows.append(jnp.broadcast_to(tiles(doc)[:, None], F.shape))
    return jnp.stack([x.reshape(B, H, Tp) for x in rows], axis=2)


def fused_forward(q, k, v, rows, h0, *, L, eps, cfg, residuals):
    """q, k [B, Tp, H, K], v [B, Tp, H, V] bf16 / fp16 (q unscaled); rows [B, H, R, Tp]
    (`tile_rows`); h0 None or (C0 [B, H, K, V], n0 [B, H, K / 64, 64]) float32. Returns h
    [B, Tp, H, V] in v's dtype, the final C [B, H, K, V] and n [B, H, K / 64, 64] float32, and
    with `residuals` each chunk's (L tokens) entering C_in [B, H, Tp / L, K, V] in v's dtype,
    n_in [B, H, Tp / L, K / 64, 64] float32 and den [B, H, 1, Tp] float32."""
    B, Tp, H, K = q.shape
    V, dt, R = v.shape[-1], v.dtype, rows.shape[2]
    C = LANES
    docs = R > 6
    NQ, NB, NKB, NT, NL = Tp // C, V // C, K // C, L // C, Tp // L
    ops = Ops(interpreting(cfg))
    stages = min(STAGES, NQ)
    has_h0 = h0 is not None
    sq = (C, C)

    def body(*refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None               # noqa: E731
        q_ref, k_ref, v_ref, r_ref, c0_ref, n0_ref = (pop(), pop(), pop(), pop(), pop(has_h0),
                                                      pop(has_h0))
        h_ref, cf_ref, nf_ref = pop(), pop(), pop()
        cin_ref, nin_ref, den_ref = pop(residuals), pop(residuals), pop(residuals)
        qs, ks, vs, rs, sw, uvh, uvl, os_, fw, nsm, dens = (pop() for _ in range(11))
        in_bar, used_bar, own_bar = refs
        b, h, cb, w = (lax.axis_index(a) for a in ("b", "h", "c", "wg"))
        vc = pl.ds(cb * C, C)

        def issue(step, slot):
            t = pl.ds(step * C, C)
            load(in_bar.at[slot], slot, (q_ref.at[b, t, h], qs), (k_ref.at[b, t, h], ks),
                 (v_ref.at[b, t, h, vc], vs), (r_ref.at[b, h, :, t], rs))

        @ops.walk_warpgroups(w, 1, (issue, NQ, stages, used_bar), cb, NKB)
        def _consumer(_vc, kblk):
            S = enter_blocks(ops, (lambda kr: c0_ref.at[b, h, kr, vc]) if has_h0 else None,
                             kblk, fw, own_bar.at[0], sw, dt)
            if has_h0:
                plgpu.copy_gmem_to_smem(n0_ref.at[b, h], nsm, own_bar.at[0])
                plgpu.barrier_wait(own_bar.at[0])
                nv = [ops.col(nsm.at[i][...]) for i in range(NKB)]
            else:
                nv = [ops.col(jnp.zeros((C,), f32)) for _ in range(NKB)]

            def send_n(nv, dst, on):
                """n's blocks through nsm to dst where `on` (the vc = 0 CTAs)."""
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)        # nsm's previous store
                for i in range(NKB):
                    nsm[i] = nv[i]
                plgpu.commit_smem()
                pl.when(on)(lambda: plgpu.copy_smem_to_gmem(nsm, dst))

            def step_fn(step, carry):
                S, nv = list(carry[:NKB]), list(carry[NKB:])
                slot = lax.rem(step, stages)
                qx, kx, vx, rx = qs.at[slot], ks.at[slot], vs.at[slot], rs.at[slot]
                t = pl.ds(step * C, C)
                plgpu.barrier_wait(in_bar.at[slot])
                if residuals:                                  # the chunk's entering state
                    @pl.when(lax.rem(step, NT) == 0)
                    def _():
                        n = lax.div(step, NT)
                        send_n(nv, nin_ref.at[b, h, n], cb == 0)
                        plgpu.copy_smem_to_gmem(sw, cin_ref.at[b, h, n, :, vc])

                A, o = ops.mm(prod(qx, kx, tb=True), prod(qx, sw))
                a = ops.rows_of(ops.row(rx.at[0][...]), sq)
                wv = ops.row(rx.at[1][...])
                bj = ops.cols_of(ops.col(rx.at[3][...]), sq)
                u = ops.row(rx.at[4][...])
                dec_r, dec_c = ops.row(rx.at[5][...]), ops.col(rx.at[5][...])
                dq = dk = None
                if docs:
                    dq = ops.rows_of(ops.row(rx.at[6][...]), sq)
                    dk = ops.cols_of(ops.col(rx.at[6][...]), sq)
                P = A * pair_factor(ops, a, bj, ops.iota(sq, 0), ops.iota(sq, 1), dq, dk)
                nq = sum(jnp.sum(ops.acc(qx.at[:, kr][...]).astype(f32)
                                 * ops.cols_of(nv[i], sq), axis=1)
                         for i, kr in enumerate(kblk))
                den = wv * nq + jnp.sum(P, axis=1)
                (num,) = ops.mm(prod(P.astype(dt), vx, o * ops.rows_of(wv, sq)))
                floor = jnp.exp(jnp.minimum(ops.row(rx.at[2][...]), MAX_LOG_FLOOR))
                hv = num / ops.rows_of(jnp.maximum(jnp.abs(den), floor) + eps, sq)
                uv = ops.acc(vx[...]).astype(f32) * ops.rows_of(u, sq)
                hi, lo = split_hi_lo(uv, dt)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last h, den, C_in stores
                os_[...] = hv.astype(dt)
                uvh[...] = hi
                uvl[...] = lo
                if residuals:
                    dens[0] = den
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(os_, h_ref.at[b, t, h, vc])
                if residuals:
                    pl.when(cb == 0)(
                        lambda: plgpu.copy_smem_to_gmem(dens, den_ref.at[b, h, :, t]))
                U = mm_sum(ops, *[(None, [term(kx.at[:, kr], uvh, ta=True),
                                          term(kx.at[:, kr], uvl, ta=True)]) for kr in kblk])
                dS = ops.rows_of(dec_r, sq)
                S = [s * dS + x for s, x in zip(S, U, strict=True)]
                nv = [n * dec_c + jnp.sum(ops.acc(kx.at[:, kr][...]).astype(f32)
                                          * ops.rows_of(u, sq), axis=0)
                      for n, kr in zip(nv, kblk, strict=True)]       # k loaded late: registers
                plgpu.barrier_arrive(used_bar.at[slot])   # every read of this slot is complete
                stage_state(S, sw, kblk)
                return tuple(S) + tuple(nv)

            carry = lax.fori_loop(0, NQ, step_fn, tuple(S) + tuple(nv))
            S, nv = list(carry[:NKB]), list(carry[NKB:])
            write_blocks(S, kblk, fw, lambda kr: cf_ref.at[b, h, kr, vc])
            send_n(nv, nf_ref.at[b, h], cb == 0)
            plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct((B, Tp, H, V), dt), jax.ShapeDtypeStruct((B, H, K, V), f32),
                jax.ShapeDtypeStruct((B, H, NKB, C), f32)]
    if residuals:
        out_type += [jax.ShapeDtypeStruct((B, H, NL, K, V), dt),
                     jax.ShapeDtypeStruct((B, H, NL, NKB, C), f32),
                     jax.ShapeDtypeStruct((B, H, 1, Tp), f32)]
    scratch = [smem((stages, C, K), dt), smem((stages, C, K), dt), smem((stages, C, C), dt),
               plgpu.SMEM((stages, R, C), f32), smem((K, C), dt), smem((C, C), dt),
               smem((C, C), dt), smem((C, C), dt), smem((C, C), f32),
               plgpu.SMEM((NKB, C), f32), plgpu.SMEM((1, C), f32)]
    check_smem("mlstm fused forward", scratch, "use K, V <= 128")
    kernel = launch_walk(body, cfg, ops, out_type=out_type, scratch=scratch, cells=(B, H, 1, NB),
                         consumers=1, copies=4, stages=stages, name="mlstm_fused", split=True)
    args = (q, k, v, rows) + (tuple(h0) if has_h0 else ())
    return kernel(*args)
