"""Pallas GPU kernels of the chunkwise mLSTM (`mlstm`, impl="pallas"), Triton lowering.

The function is `linear_jax.ops.mlstm` (TFLA's chunkwise form, Beck et al. 2025): per chunk of C
rows, with q already scaled, l = logsigmoid(f), D_ij = sum_{j<s<=i} l_s, the entering state
(C_in, n_in, m_in) and the recurrent stabiliser m_i of every row,

    E_ij  = exp(D_ij + i_j - m_i)  on causal same-document pairs,   P = (q k^T) * E
    w_i   = exp(sum_{s<=i} l_s + m_in - m_i)  on rows still in the entering document
    o_i   = sum_j P_ij v_j + w_i C_in^T q_i,      z_i = sum_j P_ij + w_i n_in . q_i
    h_i   = o_i / (max(|z_i|, exp(min(-m_i, 80))) + eps)                 (the op's normalise)
    S_out = alpha S_in + sum_j beta_j k_j [v_j, 1]          (S = [C | n], both stabilised by m)
    alpha = keep exp(g + m_in - m_out),   g = the last document's gates in the chunk,
    beta_j = exp(R_j + i_j - m_out) on the last document's rows,   R_j = sum_{s>j} l_s

The kernels do not form m: it is the recurrent m_t itself, m_t = max(l_t + m_{t-1}, i_t)
(restarting from 0 at a reset), a scalar recurrence that XLA runs as one max-plus associative scan
(`running_max`). The kernels take m and m_prev (m_{t-1}; m_0's predecessor is the initial m) as
inputs, so m_in and m_out are m_prev of the chunk's first row and m of its last; every exponent
above is then <= 0 (up to rounding) whatever the gates, as in TFLA. Their backward returns dm and
dm_prev as plain partial derivatives, and XLA's autodiff of the scan routes them through the max.
The normalisation (eps, the floor) also runs in XLA on the kernels' (o, z).

Tiling (TFLA's two levels). Chunks of C rows (16 to 256) carry the state recurrence; inside a
chunk the kernels work on tiles (`MLSTMConfig`: query tiles of BQ rows and key/value tiles of BKV
in the output kernel, squares of Bt = min(BQ, BKV) rows in the backward and the state passes, all
capped at C; at C <= the tiles a chunk is one tile). A key tile that ends at or before the query
tile starts (off the diagonal) takes D from the two tile edges, e the key tile's end and b the
query tile's start: D_ij = F(j, e] + F(e, b] + F(b, i], F the sums of exactly those gates (within
a tile a masked sum, between tiles a masked sum over the chunk); on the diagonal the larger tile
holds both and D is the 0/1 mask product above. The exponent stays D_ij + i_j - m_i <= 0.

Kernels: the state pass (`_state_pass`, grid (B*H, V/BV), writes every chunk's entering [C | n]),
the parallel output kernel (`_output`, grid (B*H, T/BQ, V/BV): per query tile a loop over the key
tiles before it, then the diagonal ones); backward (`jax.custom_vjp`): the reverse state pass (the
same kernel: dS_n = alpha dS_{n+1} + sum_i w_i q_i [do_i, dz_i]), then one kernel per chunk
(`_grads`, grid (B*H, N)) for dq, dk, dv, di, dl, dm, dm_prev, with Z = dP * P,
y_i = w_i q_i . (C_in do_i + n_in dz_i), sigma_j = beta_j k_j . (dC_out v_j + dn_out) and
rho = alpha <S_in, dS_out>:

    dm_i = -sum_j Z_ij - y_i,      dm_in += sum_i y_i + rho,      dm_out -= rho + sum_j sigma_j
    di_j = sum_i Z_ij + sigma_j
    dl_s = sum_{i>=s, j<s} Z_ij + sum_{i>=s} y_i + rho [s in the last document] + sum_{j<s} sigma_j

`_grads` loops over the chunk's tiles t: as queries against the key tiles before it (dq, row sums
of Z), as keys against the query tiles after it (dk, dv, column sums of Z; each off-diagonal block
is formed twice, once per role), and its diagonal block. For s in tile t, dl's Z term splits by
where i and j lie: both in t (the diagonal block), i in t and j before it (the row sums), j in t
and i after it (the column sums), or i after t and j before it: the sums of the blocks across t,
the same for every s in t, which the key-role loops of the earlier tiles accumulate (`gap_rows`);
the y and sigma terms likewise split into their part in t and the tiles after / before it.

Every span of gates is summed from exactly the gates inside it (D as a product of 0/1 masks with
l, no difference of cumulative sums), and so are the gate gradients. Padding: T to a multiple of C
(padded rows add no state, their outputs are dropped), K to a power of two, V to a multiple of 16.
bf16/fp16 inputs run dot operands in their dtype with float32 accumulation; float32 inputs run IEEE
float32 dots; states, gates and m are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from linear_jax.kernels._compat import dot, interpret, pl, triton_params
from linear_jax.kernels.gpu import common

from linear_jax.ops.common.chunking import doc_index, pad_time, resets
from linear_jax.ops.mlstm import normalise

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MLSTMConfig(common.DecayConfig):
    """`DecayConfig` plus TFLA's second level of tiling, which lets the chunk grow to 256 rows.

    block_q, block_kv: the output kernel's query and key/value tiles inside a chunk (powers of two
      >= 16, each capped at the chunk). The backward and the state passes tile the chunk in squares
      of the smaller (`tile_bwd`). With both >= the chunk, every kernel sees one tile per chunk.
    """

    MAX_CHUNK: ClassVar[int] = 256
    block_q: int = 64
    block_kv: int = 64

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_q", "block_kv"):
            val = getattr(self, name)
            if not common._pow2(val) or val < 16:
                raise ValueError(f"MLSTMConfig.{name} must be a power of two >= 16, got {val}")

    @property
    def tiles(self) -> tuple[int, int]:
        return min(self.block_q, self.chunk), min(self.block_kv, self.chunk)

    @property
    def tile_bwd(self) -> int:
        return min(self.tiles)


CONFIG = MLSTMConfig()


def running_max(i, l, m0, segment_ids):
    """m_t = max(l_t + m_{t-1}, i_t), m_{-1} = m0, restarting from 0 at a reset; [B, T, H].

    Step t is the map x -> max(x + a_t, b_t) and maps compose as (a1, b1) then (a2, b2) =
    (a1 + a2, max(b1 + a2, b2)), so a prefix scan of the pairs gives every m_t. A reset forgets x:
    a = -inf, b = max(l_t, i_t) (the zero state's candidate 0 + l_t)."""
    a, b = l, i
    if segment_ids is not None:
        r = resets(segment_ids)[..., None]
        a, b = jnp.where(r, -jnp.inf, l), jnp.where(r, jnp.maximum(l, i), i)
    combine = lambda x, y: (x[0] + y[0], jnp.maximum(x[1] + y[0], y[1]))
    A, Bm = lax.associative_scan(combine, (a, b), axis=1)
    return jnp.maximum(m0[:, None, :] + A, Bm)


def _chunk(refs, n, C):
    """Chunk n's gates as a whole: l [C], the entering / leaving m and documents, alpha."""
    _, l_ref, m_ref, mp_ref, doc_ref = refs
    l, d = l_ref[pl.ds(n * C, C)], doc_ref[pl.ds(n * C, C)]
    m_in, m_out = mp_ref[n * C], m_ref[n * C + C - 1]
    d_in, d_last = doc_ref[jnp.maximum(n * C - 1, 0)], doc_ref[n * C + C - 1]
    g = jnp.sum(jnp.where(d == d_last, l, 0.0))
    return dict(n=n, C=C, l=l, pos=jnp.arange(C, dtype=jnp.int32), m_in=m_in, m_out=m_out,
                d_in=d_in, d_last=d_last, alpha=_masked_exp(d_last == d_in, g + m_in - m_out))


def _masked_exp(ok, x):
    return jnp.exp(jnp.where(ok, x, -jnp.inf))


def _span(ch, lo, hi):
    """sum of l over the chunk's rows [lo, hi), from exactly those gates."""
    return jnp.sum(jnp.where((ch["pos"] >= lo) & (ch["pos"] < hi), ch["l"], 0.0))


def _tile(refs, ch, r0, R, T, inter=False):
    """Rows [r0, r0 + R) of chunk ch: gates, lo_i = sum_{r0<=s<=i} l_s, hi_j = sum_{j<s<r0+R} l_s;
    with `inter` also w and beta (module docstring) and the last document's rows."""
    i_ref, l_ref, m_ref, _, doc_ref = refs
    start = ch["n"] * ch["C"] + r0
    rows = pl.ds(start, R)
    ig, l, m, d = i_ref[rows], l_ref[rows], m_ref[rows], doc_ref[rows]
    idx = jnp.arange(R, dtype=jnp.int32)
    r, c = idx[:, None], idx[None, :]
    t = dict(r0=r0, R=R, ig=ig, l=l, m=m, doc=d, pos=r0 + idx,
             real=start + idx < T,                 # padded rows add no candidate and no state
             lo=jnp.sum(jnp.where(c <= r, l[None, :], 0.0), axis=1),
             hi=jnp.sum(jnp.where(c > r, l[None, :], 0.0), axis=1))
    if inter:
        t["out_rows"] = d == ch["d_last"]
        t["w"] = _masked_exp(d == ch["d_in"], _span(ch, 0, r0) + t["lo"] + ch["m_in"] - m)
        t["beta"] = _masked_exp(t["out_rows"] & t["real"],
                                t["hi"] + _span(ch, r0 + R, ch["C"]) + ig - ch["m_out"])
    return t


def _pair_exp(ch, qt, kt, diag):
    """E [Rq, Rk] of query tile qt and key tile kt (from `_tile`).

    Off the diagonal (kt ends at or before qt starts), D_ij splits at the two tile edges into
    hi_j + (the gates between the tiles) + lo_i. On it, the larger tile holds both, and D is the
    0/1 mask product over that window, as for a whole chunk."""
    ok = (qt["doc"][:, None] == kt["doc"][None, :]) & kt["real"][None, :]
    if not diag:
        gap = _span(ch, kt["r0"] + kt["R"], qt["r0"])
        D = qt["lo"][:, None] + (kt["hi"] + gap)[None, :]
        return _masked_exp(ok, D + kt["ig"][None, :] - qt["m"][:, None])
    win = qt if qt["R"] >= kt["R"] else kt
    s = win["pos"]
    below = (s[None, :] <= qt["pos"][:, None]).astype(f32)                  # [Rq, W]: s <= i
    after = jnp.where(s[:, None] > kt["pos"][None, :], win["l"][:, None], 0.0)   # [W, Rk]: s > j
    D = dot(below, after, exact=True)
    ok = ok & (kt["pos"][None, :] <= qt["pos"][:, None])
    return _masked_exp(ok, D + kt["ig"][None, :] - qt["m"][:, None])


def _sum_tiles(part, NT):
    """part(0) + ... + part(NT - 1) (tuples add leaf by leaf); a single tile is part(0) alone."""
    acc = part(0)
    if NT > 1:
        add = lambda t, a: jax.tree.map(jnp.add, a, part(t))
        acc = lax.fori_loop(1, NT, add, acc)
    return acc


def _loop(lo, hi, body, init):
    """lax.fori_loop that vanishes when its bounds are static and empty (a single tile)."""
    if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
        return init
    return lax.fori_loop(lo, hi, body, init)


def _gate_specs(H, Tp):
    return [common.spec(H, Tp)] * 4 + [common.doc_spec(H, Tp)]


def _state_pass(x, y, y1, gates, S0, s0, *, cfg, T, reverse, scale):
    """Forward (x = k, y = v, y1 None: the normaliser's column of ones):
        S_{n+1} = alpha S_n + sum_j beta_j k_j [v_j, 1].
    Reverse (x = q, y = do, y1 = dz):
        dS_n = alpha dS_{n+1} + sum_i w_i scale q_i [do_i, dz_i].
    The chunk's sum runs over tiles of cfg.tile_bwd rows. Writes the state on one side of every
    chunk (forward: entering; reverse: leaving) and the end state:
    ([B,H,N,Kp,Vp], [B,H,N,Kp], [B,H,Kp,Vp], [B,H,Kp]) float32."""
    B, Tp, H, Kp = x.shape
    Vp, C = y.shape[-1], cfg.chunk
    N, Bt = Tp // C, cfg.tile_bwd
    _, BV = common.state_tiles(B * H, Kp, Vp, cfg, split_k=False)
    exact = x.dtype == f32

    def kernel(x_ref, y_ref, *refs):
        y1_ref, refs = (refs[0], refs[1:]) if reverse else (None, refs)
        gate_refs, (S0_ref, s0_ref, hs_ref, ns_ref, S_ref, s_ref) = refs[:5], refs[5:]
        first = pl.program_id(1) == 0              # the V tile that writes the normaliser

        def step(it, carry):
            S, s = carry
            n = N - 1 - it if reverse else it
            hs_ref[n] = S

            @pl.when(first)
            def _():
                ns_ref[n] = s

            ch = _chunk(gate_refs, n, C)

            def part(b):
                t = _tile(gate_refs, ch, b * Bt, Bt, T, inter=True)
                rows = pl.ds(n * C + b * Bt, Bt)
                xn = x_ref[rows, :].astype(f32)
                xn = xn * (t["w"] * scale)[:, None] if reverse else xn * t["beta"][:, None]
                yn = y_ref[rows, :].astype(x.dtype)
                col = xn * y1_ref[rows][:, None] if reverse else xn
                return (dot(xn.astype(x.dtype), yn, ta=True, exact=exact), jnp.sum(col, axis=0))

            dS, ds = _sum_tiles(part, C // Bt)
            return ch["alpha"] * S + dS, ch["alpha"] * s + ds

        S, s = lax.fori_loop(0, N, step, (S0_ref[...], s0_ref[...]))
        S_ref[...] = S

        @pl.when(first)
        def _():
            s_ref[...] = s

    vec = pl.BlockSpec((None, None, Kp), lambda bh, j: (bh // H, bh % H, 0))
    vecs = pl.BlockSpec((None, None, N, Kp), lambda bh, j: (bh // H, bh % H, 0, 0))
    ones = [] if y1 is None else [y1]
    return pl.pallas_call(
        kernel,
        grid=(B * H, Vp // BV),
        in_specs=[common.spec(H, Tp, Kp), common.spec(H, Tp, BV, x=0),
                  *[common.spec(H, Tp)] * len(ones), *_gate_specs(H, Tp),
                  common.state_spec(H, Kp, BV, v=0), vec],
        out_specs=[common.states_spec(H, N, Kp, BV, v=0), vecs, common.state_spec(H, Kp, BV, v=0),
                   vec],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, Kp, Vp), f32),
                   jax.ShapeDtypeStruct((B, H, N, Kp), f32),
                   jax.ShapeDtypeStruct((B, H, Kp, Vp), f32),
                   jax.ShapeDtypeStruct((B, H, Kp), f32)],
        compiler_params=triton_params(cfg.warps_state, cfg.stages_state),
        interpret=interpret(),
        name="mlstm_state_bwd" if reverse else "mlstm_state_fwd",
    )(x, y, *ones, *gates, S0, s0)


def _chunk_vec(H, Kp):
    """[B, H, N, Kp] per-chunk normaliser states: chunk n's row."""
    return pl.BlockSpec((None, None, None, Kp), lambda bh, n, *g: (bh // H, bh % H, n, 0))


def _output(q, k, v, gates, hs, ns, *, cfg, T, scale):
    """(o [B, Tp, H, Vp], z [B, Tp, H]) float32: the unnormalised output and normaliser.

    Grid (B*H, Tp/BQ, Vp/BV): one query tile of BQ rows, its chunk's key tiles of BKV rows before
    it (a loop), then those on its diagonal."""
    B, Tp, H, Kp = q.shape
    Vp, C = v.shape[-1], cfg.chunk
    BQ, BKV = cfg.tiles
    NQ, BV = C // BQ, common.value_block(Vp, cfg.block_v_out)
    exact = q.dtype == f32

    def kernel(q_ref, k_ref, v_ref, *refs):
        gate_refs, (h_ref, n_ref, o_ref, z_ref) = refs[:5], refs[5:]
        g = pl.program_id(1)
        a = g % NQ if NQ > 1 else 0
        ch = _chunk(gate_refs, g // NQ, C)
        qt = _tile(gate_refs, ch, a * BQ, BQ, T, inter=True)
        q = q_ref[...]

        def kv(b, carry, diag=False):
            kt = _tile(gate_refs, ch, b * BKV, BKV, T)
            rows = pl.ds(b * BKV, BKV)
            P = dot(q, k_ref[rows, :], tb=True, exact=exact) * scale * _pair_exp(ch, qt, kt, diag)
            return (carry[0] + dot(P.astype(q.dtype), v_ref[rows, :], exact=exact),
                    carry[1] + jnp.sum(P, axis=1))

        first_diag = a * BQ // BKV                 # key tiles before it end before the query tile
        o, z = _loop(0, first_diag, kv, (jnp.zeros((BQ, BV), f32), jnp.zeros((BQ,), f32)))
        for d in range(max(BQ // BKV, 1)):
            o, z = kv(first_diag + d, (o, z), diag=True)
        qs, w = q.astype(f32) * scale, qt["w"]
        o_ref[...] = o + w[:, None] * dot(qs.astype(q.dtype), h_ref[...].astype(q.dtype),
                                          exact=exact)

        @pl.when(pl.program_id(2) == 0)
        def _():
            z_ref[...] = z + w * jnp.sum(qs * n_ref[...][None, :], axis=1)

    chunk_of = lambda bh, g, j: (bh // H, g // NQ, bh % H)
    return pl.pallas_call(
        kernel,
        grid=(B * H, Tp // BQ, Vp // BV),
        in_specs=[common.spec(H, BQ, Kp, t=0),
                  pl.BlockSpec((None, C, None, Kp), lambda *g: (*chunk_of(*g), 0)),
                  pl.BlockSpec((None, C, None, BV), lambda *g: (*chunk_of(*g), g[2])),
                  *_gate_specs(H, Tp),
                  pl.BlockSpec((None, None, None, Kp, BV),
                               lambda bh, g, j: (bh // H, bh % H, g // NQ, 0, j)),
                  pl.BlockSpec((None, None, None, Kp),
                               lambda bh, g, j: (bh // H, bh % H, g // NQ, 0))],
        out_specs=[common.spec(H, BQ, BV, t=0, x=1), common.spec(H, BQ, t=0)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Vp), f32),
                   jax.ShapeDtypeStruct((B, Tp, H), f32)],
        compiler_params=triton_params(cfg.warps_out, cfg.stages_out),
        interpret=interpret(), name="mlstm_output",
    )(q, k, v, *gates, hs, ns)


def _grads(q, k, v, gates, hs, ns, dhs, dns, do, dz, *, cfg, T, scale):
    """dq, dk, dv (input dtypes) and di, dl, dm, dm_prev [B, Tp, H] float32 (module docstring).

    Grid (B*H, N): a loop over the chunk's tiles c of Bt rows; tile c as queries meets the key
    tiles before it (dq), as keys the query tiles after it (dk, dv), then its diagonal block."""
    B, Tp, H, Kp = q.shape
    Vp, C = v.shape[-1], cfg.chunk
    Bt = cfg.tile_bwd
    N, NT, BV = Tp // C, C // Bt, common.value_block(Vp, cfg.block_v_out)
    exact, cd = q.dtype == f32, q.dtype
    vcols = [pl.ds(b * BV, BV) for b in range(Vp // BV)]

    def kernel(q_ref, k_ref, v_ref, *refs):
        gate_refs, refs = refs[:5], refs[5:]
        h_ref, n_ref, dh_ref, dn_ref, do_ref, dz_ref = refs[:6]
        dq_ref, dk_ref, dv_ref, di_ref, dl_ref, dm_ref, dmp_ref = refs[6:]
        ch = _chunk(gate_refs, pl.program_id(1), C)
        pos, idx = ch["pos"], jnp.arange(Bt, dtype=jnp.int32)
        r, c = idx[:, None], idx[None, :]
        rows = lambda t: pl.ds(t * Bt, Bt)
        tile = lambda t, inter=False: _tile(gate_refs, ch, t * Bt, Bt, T, inter)
        rho = jnp.sum(n_ref[...] * dn_ref[...])
        for cols in vcols:
            rho += jnp.sum(h_ref[:, cols] * dh_ref[:, cols])
        rho = ch["alpha"] * rho

        def q_side(t, qt):
            """C_in do_i + n_in dz_i and y_i on the rows of tile t."""
            dq_in = dz_ref[rows(t)][:, None] * n_ref[...][None, :]
            for cols in vcols:
                dq_in += dot(do_ref[rows(t), cols].astype(cd), h_ref[:, cols].astype(cd), tb=True,
                             exact=exact)
            qs = q_ref[rows(t), :].astype(f32) * scale
            return dq_in, qt["w"] * jnp.sum(qs * dq_in, axis=1)

        def pair(a, b, qt, kt, diag=False):
            """P, dP * E (dot dtype) and Z = dP * P of query tile a and key tile b."""
            E = _pair_exp(ch, qt, kt, diag)
            P = dot(q_ref[rows(a), :], k_ref[rows(b), :], tb=True, exact=exact) * scale * E
            dP = jnp.broadcast_to(dz_ref[rows(a)][:, None], (Bt, Bt))
            for cols in vcols:
                dP += dot(do_ref[rows(a), cols].astype(cd), v_ref[rows(b), cols], tb=True,
                          exact=exact)
            return P, (dP * E).astype(cd), dP * P

        # y summed over the tiles after each tile (dl's y term crosses tiles), at the tiles' rows
        def y_after(t, acc):
            return acc + jnp.where(pos < t * Bt, jnp.sum(q_side(t, tile(t, True))[1]), 0.0)

        y_rows = _loop(1, NT, y_after, jnp.zeros((C,), f32))

        def body(t, carry):
            gap_rows, sigma_before, y_all = carry
            tt = tile(t, inter=True)
            q_t, k_t = q_ref[rows(t), :], k_ref[rows(t), :]
            P, dPE, Z = pair(t, t, tt, tt, diag=True)
            dq = dot(dPE, k_t, exact=exact)
            dk = dot(dPE, q_t, ta=True, exact=exact)
            dv = tuple(dot(P.astype(cd), do_ref[rows(t), cols].astype(cd), ta=True, exact=exact)
                       for cols in vcols)

            def left(b, acc):                      # key tiles b < t: dq, row sums of Z
                _, dPE, Z = pair(t, b, tt, tile(b))
                return acc[0] + dot(dPE, k_ref[rows(b), :], exact=exact), acc[1] + jnp.sum(Z, 1)

            def right(a, acc):                     # query tiles a > t: dk, dv, column sums of Z
                dk, dv, col, gap_rows = acc
                P, dPE, Z = pair(a, t, tile(a), tt)
                dv = tuple(x + dot(P.astype(cd), do_ref[rows(a), cols].astype(cd), ta=True,
                                   exact=exact) for x, cols in zip(dv, vcols, strict=True))
                between = (pos >= (t + 1) * Bt) & (pos < a * Bt)
                return (dk + dot(dPE, q_ref[rows(a), :], ta=True, exact=exact), dv,
                        col + jnp.sum(Z, 0), gap_rows + jnp.where(between, jnp.sum(Z), 0.0))

            zero = jnp.zeros((Bt,), f32)
            dq, row = _loop(0, t, left, (dq, zero))
            dk, dv, col, gap_rows = _loop(t + 1, NT, right, (dk, dv, zero, gap_rows))

            # the inter-chunk terms (after the loops: fewer live registers through them)
            dq_in, y = q_side(t, tt)
            dk_out = jnp.broadcast_to(dn_ref[...][None, :], (Bt, Kp))   # dC_out v_j + dn_out
            for cols in vcols:
                dk_out += dot(v_ref[rows(t), cols], dh_ref[:, cols].astype(cd), tb=True,
                              exact=exact)
            sigma = tt["beta"] * jnp.sum(k_t.astype(f32) * dk_out, axis=1)

            dq_ref[rows(t), :] = ((dq + tt["w"][:, None] * dq_in) * scale).astype(dq_ref.dtype)
            dk_ref[rows(t), :] = (dk * scale + tt["beta"][:, None] * dk_out).astype(dk_ref.dtype)
            kb = (k_t.astype(f32) * tt["beta"][:, None]).astype(cd)
            for x, cols in zip(dv, vcols, strict=True):
                dv_ref[rows(t), cols] = (x + dot(kb, dh_ref[:, cols].astype(cd), exact=exact)
                                         ).astype(dv_ref.dtype)
            di_ref[rows(t)] = jnp.sum(Z, axis=0) + col + sigma
            last = tt["pos"] == C - 1
            dm_ref[rows(t)] = (-jnp.sum(Z, axis=1) - row - y
                               - jnp.where(last, rho + sigma_before + jnp.sum(sigma), 0.0))
            # dl_s, s in tile t: the diagonal block's sum_{i>=s, j<s} Z_ij (the transposed causal
            # mask times Z), the off-diagonal row / column sums inside the tile, and the blocks
            # with i and j on either side of the tile (gap_rows), as a value at the tile's rows
            at_tile = lambda x: jnp.sum(jnp.where(pos == t * Bt, x, 0.0))
            UZ = dot((r <= c).astype(f32), Z, exact=True)
            dl_ref[rows(t)] = (jnp.sum(jnp.where(c < r, UZ, 0.0), axis=1)
                               + jnp.sum(jnp.where(c >= r, (y + row)[None, :], 0.0), axis=1)
                               + at_tile(y_rows + gap_rows)
                               + jnp.where(tt["out_rows"], rho, 0.0)
                               + jnp.sum(jnp.where(c < r, (sigma + col)[None, :], 0.0), axis=1)
                               + sigma_before)
            return gap_rows, sigma_before + jnp.sum(sigma), y_all + jnp.sum(y)

        init = (jnp.zeros((C,), f32), jnp.zeros((), f32), jnp.zeros((), f32))
        _, _, y_all = body(0, init) if NT == 1 else lax.fori_loop(0, NT, body, init)
        dmp_ref[...] = jnp.where(pos == 0, y_all + rho, 0.0)

    rows = lambda X: common.spec(H, C, X, t=0)
    state = common.states_spec(H, N, Kp, Vp, n=0)
    scalar = common.spec(H, C, t=0)
    shp = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    sc = jax.ShapeDtypeStruct((B, Tp, H), f32)
    return pl.pallas_call(
        kernel,
        grid=(B * H, N),
        in_specs=[rows(Kp), rows(Kp), rows(Vp), *_gate_specs(H, Tp), state, _chunk_vec(H, Kp),
                  state, _chunk_vec(H, Kp), rows(Vp), scalar],
        out_specs=[rows(Kp), rows(Kp), rows(Vp)] + [scalar] * 4,
        out_shape=[shp(q), shp(k), shp(v), sc, sc, sc, sc],
        compiler_params=triton_params(cfg.warps_bwd, cfg.stages_bwd),
        interpret=interpret(), name="mlstm_backward",
    )(q, k, v, *gates, hs, ns, dhs, dns, do, dz)


@functools.cache
def _core(cfg, T, scale):
    """custom_vjp of the padded (q, k, v, i, l, m, m_prev, doc, C0, n0) -> (o, z, C_T, n_T)."""
    kw = dict(cfg=cfg, T=T, scale=scale)

    def fwd(q, k, v, i, l, m, mp, doc, C0, n0):
        gates = (i, l, m, mp, doc)
        hs, ns, CT, nT = _state_pass(k, v, None, gates, C0, n0, reverse=False, **kw)
        o, z = _output(q, k, v, gates, hs, ns, **kw)
        return (o, z, CT, nT), (q, k, v, gates, hs, ns)

    def bwd(res, cts):
        q, k, v, gates, hs, ns = res
        do, dz, dCT, dnT = cts
        dhs, dns, dC0, dn0 = _state_pass(q, do, dz, gates, dCT, dnT, reverse=True, **kw)
        dq, dk, dv, di, dl, dm, dmp = _grads(q, k, v, gates, hs, ns, dhs, dns, do, dz, **kw)
        return dq, dk, dv, di, dl, dm, dmp, None, dC0, dn0

    f = jax.custom_vjp(lambda *a: fwd(*a)[0])
    f.defvjp(fwd, bwd)
    return f


def mlstm(q, k, v, i, f, *, scale, initial_state, segment_ids, chunk_size, eps, config=None):
    """The op's chunk-impl signature (heads expanded): returns (h [B, T, H, V] in v's dtype,
    (C [B, H, K, V], n [B, H, K], m [B, H]) float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = (config or CONFIG).for_chunk(chunk_size)
    C = cfg.chunk
    Tp, Kp, Vp, pad = common.padded_inputs(q, k, v, C)
    if initial_state is None:
        C0, n0, m0 = (jnp.zeros(s, f32) for s in ((B, H, K, V), (B, H, K), (B, H)))
    else:
        C0, n0, m0 = (s.astype(f32) for s in initial_state)
    ig, l = i.astype(f32), jax.nn.log_sigmoid(f.astype(f32))
    m = running_max(ig, l, m0, segment_ids)
    mp = jnp.concatenate([m0[:, None], m[:, :-1]], axis=1)
    doc = (doc_index(segment_ids) if segment_ids is not None else jnp.zeros((B, T), jnp.int32))
    edge = lambda x: pad_time(x, Tp, mode="edge")
    o, z, CT, nT = _core(cfg, T, float(scale))(
        pad(q, Kp), pad(k, Kp), pad(v, Vp), pad_time(ig, Tp), pad_time(l, Tp), edge(m), edge(mp),
        edge(doc.astype(jnp.int32)),
        jnp.pad(C0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))),
        jnp.pad(n0, ((0, 0), (0, 0), (0, Kp - K))))
    h = normalise(o[:, :T, :, :V], z[:, :T], m, eps)
    return h.astype(v.dtype), (CT[:, :, :K, :V], nT[:, :, :K], m[:, -1])
