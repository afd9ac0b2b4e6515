"""The Hopper mLSTM output kernel (`mlstm`'s docstring has the math and the tiling) and the tile
pieces its backward kernels (`mlstm_bwd`) share with it: the per-token rows, the pair factor, the
tile setup, the key tiles' copies and the kernel's launch.

Rows, [B, H, R, Tp] float32, in this order (`ROWS`): the query side a = F - m + log s, w (the
entering state's weight times the scale s, 0 on rows a packed document cut off from it),
negm = -m; the key side b = i - F and, with packed documents, doc (the document index). Key
tiles read rows KEY0.. only, so one TMA copy brings them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.gpu.hopper.common import (
    LANES,
    Ops,
    check_smem,
    f32,
    interpreting,
    launch,
    pl,
    plgpu,
    prod,
    smem,
)
from linear_jax.ops.common.normalise import MAX_LOG_FLOOR

ROWS = ("a", "w", "negm", "b", "doc")
KEY0 = 3            # the first key-side row


def pair_factor(ops, a, b, qpos, kpos, dq=None, dk=None):
    """exp(a + b) on the causal (kpos <= qpos) same-document pairs of a [64, 64] tile, else 0;
    every argument a [64, 64] broadcast. The exponent is clamped at 0 (m bounds it up to
    rounding)."""
    keep = kpos <= qpos
    if dq is not None:
        keep = keep & (dq == dk)
    return jnp.where(keep, jnp.exp(jnp.minimum(a + b, 0.0)), 0.0)


def chunk_of(t, NT):
    """(chunk, its first 64-row tile, t's place in it) of the 64-row tile t."""
    chunk = lax.div(t, NT)
    return chunk, chunk * NT, lax.rem(t, NT)


def tile_setup(q, v, rows, L, cfg):
    """(B, Tp, H, K, V, dtype, R, NQ, NT, docs, ops) of the kernels on the grid (B, H, Tp / 64):
    q [B, Tp, H, K], v [B, Tp, H, V], rows [B, H, R, Tp]; NQ 64-row tiles, NT of them a chunk of
    L, docs whether the rows carry the document index."""
    B, Tp, H, K = q.shape
    V, dt = v.shape[-1], v.dtype
    R = rows.shape[2]
    return B, Tp, H, K, V, dt, R, Tp // LANES, L // LANES, R > KEY0 + 1, Ops(interpreting(cfg))


def copy_key_tiles(k_ref, v_ref, r_ref, ks, vs, kr, b, h, first, NT, bar):
    """Starts the TMA copies of the chunk's NT key tiles from its first 64-row tile: k, v and
    the key-side rows (KEY0..) into ks[j], vs[j], kr.at[j], all on bar."""
    R = r_ref.shape[2]
    for j in range(NT):
        tk = pl.ds((first + j) * LANES, LANES)
        plgpu.copy_gmem_to_smem(k_ref.at[b, tk, h], ks[j], bar)
        plgpu.copy_gmem_to_smem(v_ref.at[b, tk, h], vs[j], bar)
        plgpu.copy_gmem_to_smem(r_ref.at[b, h, pl.ds(KEY0, R - KEY0), tk], kr.at[j], bar)


def kernel_of(body, out_type, grid, scratch, cfg, ops, name):
    """The `common.launch` of one mLSTM kernel (one warpgroup a 64-row tile) after its SMEM
    check."""
    check_smem(name, scratch, "lower HopperMlstmConfig.chunk")
    return launch(body, cfg, ops, out_type=out_type, grid=grid, grid_names=("b", "h", "t"),
                  scratch=scratch, name=name)


def out_kernel(q, k, v, rows, Cin, nin, *, L, eps, cfg, save):
    """q, k [B, Tp, H, K], v [B, Tp, H, V] (bf16 / fp16, q unscaled: the scale is in the rows);
    rows [B, H, R, Tp] (`ROWS`); Cin [B, H, Tp / L, K, V] in v's dtype; nin [B, H, Tp / L, K] f32.
    Returns h [B, Tp, H, V] in v's dtype and, with `save`, the normaliser's den [B, H, 1, Tp] f32
    (the backward's residual)."""
    B, Tp, H, K, V, dt, R, NQ, NT, docs, ops = tile_setup(q, v, rows, L, cfg)
    C = LANES
    shape, sq = (C, V), (C, C)

    def body(q_ref, k_ref, v_ref, r_ref, c_ref, n_ref, h_ref, *refs):
        refs = list(refs)
        den_ref = refs.pop(0) if save else None
        qs, ks, vs = refs[0], refs[1:1 + NT], refs[1 + NT:1 + 2 * NT]
        rs, kr, cs, ns, hs, *refs = refs[1 + 2 * NT:]
        dens = refs.pop(0) if save else None
        (bar,) = refs
        b, h, t = (lax.axis_index(x) for x in ("b", "h", "t"))
        chunk, first, _ = chunk_of(t, NT)
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t * C, C), h], qs, bar.at[0])
        plgpu.copy_gmem_to_smem(r_ref.at[b, h, :, pl.ds(t * C, C)], rs, bar.at[0])
        copy_key_tiles(k_ref, v_ref, r_ref, ks, vs, kr, b, h, first, NT, bar.at[0])
        plgpu.copy_gmem_to_smem(c_ref.at[b, h, chunk], cs, bar.at[0])
        plgpu.copy_gmem_to_smem(n_ref.at[b, h, pl.ds(chunk, 1)], ns, bar.at[0])
        plgpu.barrier_wait(bar.at[0])

        a = ops.rows_of(ops.row(rs.at[0][...]), sq)
        w = ops.row(rs.at[1][...])
        dq = ops.rows_of(ops.row(rs.at[KEY0 + 1][...]), sq) if docs else None
        qpos = ops.iota(sq, 0) + t * C
        (inter,) = ops.mm(prod(qs, cs))
        qf = ops.acc(qs[...]).astype(f32)
        nq = jnp.sum(qf * ops.cols_of(ops.col(ns.at[0][...]), (C, K)), axis=1)
        num = inter * ops.rows_of(w, shape)
        den = w * nq
        for j in range(NT):
            (S,) = ops.mm(prod(qs, ks[j], tb=True))
            bj = ops.cols_of(ops.col(kr.at[j, 0][...]), sq)
            dk = ops.cols_of(ops.col(kr.at[j, 1][...]), sq) if docs else None
            P = S * pair_factor(ops, a, bj, qpos, ops.iota(sq, 1) + (first + j) * C, dq, dk)
            den = den + jnp.sum(P, axis=1)
            (num,) = ops.mm(prod(P.astype(dt), vs[j], num))        # accumulates in place
        floor = jnp.exp(jnp.minimum(ops.row(rs.at[2][...]), MAX_LOG_FLOOR))     # exp(-m_i)
        hv = num / ops.rows_of(jnp.maximum(jnp.abs(den), floor) + eps, shape)
        hs[...] = hv.astype(dt)
        if save:
            dens[0] = den
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hs, h_ref.at[b, pl.ds(t * C, C), h])
        if save:
            plgpu.copy_smem_to_gmem(dens, den_ref.at[b, h, :, pl.ds(t * C, C)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [smem((C, K), dt)] + [smem((C, K), dt) for _ in range(NT)]
    scratch += [smem((C, V), dt) for _ in range(NT)]
    scratch += [plgpu.SMEM((R, C), f32), plgpu.SMEM((NT, R - KEY0, C), f32), smem((K, V), dt),
                plgpu.SMEM((1, K), f32), smem((C, V), dt)]
    scratch += [plgpu.SMEM((1, C), f32)] if save else []
    scratch += [plgpu.Barrier(num_arrivals=4 + 3 * NT, num_barriers=1)]
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    out_type += [jax.ShapeDtypeStruct((B, H, 1, Tp), f32)] if save else []
    kernel = kernel_of(body, out_type if save else out_type[0], (B, H, NQ), scratch, cfg, ops,
                       "mlstm_out")
    return kernel(q, k, v, rows, Cin, nin)
