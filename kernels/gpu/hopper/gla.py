"""GLA (vector gate: a log decay per head, step and key channel) on Hopper: Mosaic GPU kernels with
TMA, wgmma and warpgroups; the scalar-gate design of `decay` with the gate moved onto q and k.

The math (per chunk n of C = 64 rows, q scaled by `scale`, g [C, K] the chunk's log decays):

    A_ij   = scale sum_k q_ik k_jk exp(D_ijk),   D_ijk = sum_{j<s<=i} g_sk  (j <= i, one document)
    q~     = scale q * exp(Gin) in,   Gin_ik = sum_{s<=i} g_sk           (reads the entering state)
    k~     = k * exp(R) out,          R_jk   = sum_{s>j} g_sk            (writes the leaving state)
    dec_k  = keep exp(Gtot_k),        Gtot_k = sum_s g_sk
    o      = A v + q~ S_n,            S_n+1  = diag(dec) S_n + k~^T v

Exactness. exp(D) cannot be split through one reference row of the chunk (one factor is > 1 and
overflows at strong decay: g = -20 over 64 rows is e^1280), so A is cut by the dyadic levels of
the chunk: a pair j < i belongs to exactly one level s in {32, 16, 8, 4, 2, 1} (the highest bit
where i and j differ), where i lies in the odd and j in the even half of one aligned block of 2s
rows. Its span (j, i] is then (j, r] + (r, i] with r the last row of the even half, so

    A^s = (Q^s K^s^T) * M^s,   Q^s_i = q_i exp(Z^s_i) (odd halves),  K^s_j = k_j exp(Z^s_j) (even)

with Z^s = W^s g the in-block span sums (odd rows: from the half's start to i; even rows: from
j + 1 to the half's end). Both factors are <= 1, so nothing overflows and a factor underflows only
where the pair's true decay does; the diagonal i = j is q_i . k_i. Every span sum (Gin, R, Gtot,
Z^s) is a 0/1 matrix times g on wgmma, g split into two bf16 halves (hi + lo: 16 mantissa bits,
relative 2^-17 per gate), never a difference of two cumulative sums; the gate gradient routes each
row's and pair's gradient back through the transposes of the same 0/1 matrices, so it stays exact
at strong decay (every term a sum over exactly the gates of its span; nothing is subtracted):

    dg = L^T dGin + U^T dR + 1 dGtot^T + sum_s W^s^T dZ^s,
    dGin = q~ * dq~,  dR = k~ * dk~,  dGtot = dec * diag(S_n dS_n+1^T),
    dZ^s = scale (Q^s * (dA^s K^s) + K^s * (dA^s^T Q^s)),  dA = (do v^T) masked.

Stages (forward: `gates`, then `walk`; backward: `walk` in reverse, then `grad`).
  gates  chunk-parallel, grid (B, H, N), one warpgroup: loads q, k, g (hi, lo) of one chunk by
         TMA; forms Gin, then R (two span wgmmas each, the 0/1 matrix read from SMEM), q~, k~,
         dec, then the six levels (two span wgmmas, the factors, Q^s K^s^T per level) into A
         (bf16, scaled, masked), each level's pair product issued with the next level's span sums
         (one wait for both). The 0/1 matrices pass through the A tile, one at a time.
         Writes q~, k~ [B, Tp, H, K], A [B, H, N, C, C], dec [B, H, N, K/64, 64]. (One CTA
         per 64-key block, A's float32 partials summed by XLA, took 0.62 ms against 0.55 on the
         H200 at T = 2048 with three CTAs per SM instead of two: removed.)
  walk   the sequential chunk walk of `decay.walk` with A loaded rather than formed:
             forward  o = A v + q~ S_n,         S_n+1 = diag(dec) S_n + k~^T v
             reverse  dv = A^T do + k~ dS_n+1,   dS_n = diag(dec) dS_n+1 + q~^T do
         grid (B, H, P), V/64 value warpgroups (each owns 64 value columns of the float32 state,
         in registers) and a producer warpgroup streaming q~, k~, v, A, dec by TMA into `stages`
         slots; per chunk one wait: A' z + x S_n (one accumulator) and the state update y^T z
         are issued together (the update reads neither o nor S_n). Two-level for small B H
         (`HopperChunkConfig.pieces`: state pass from zero per piece, a float32 scan of the P
         maps S -> diag(d_p) S + E_p, then the output pass), and the states each chunk read
         written for the backward, as in `decay`.
  grad   chunk-parallel, grid (B, H, N), one warpgroup: q, k, v, do, g and per 64-key block the
         tiles S_n, dS_n+1; dq~ = do S_n^T, dk~ = v dS_n+1^T, dA = do v^T, the chunk factors again,
         the six levels (dA^s K^s, dA^s^T Q^s, the span wgmmas), dg routed on wgmma as above
         (the routed tiles in two bf16 halves; each level's routing issued with the next
         level's span sums), <S_n, dS_n+1> per key as a float32 row sum. Writes dq, dk (q's
         dtype) and dg float32. The 0/1 matrices L, U in the output tiles of dq, dk (free until
         the block's end), the levels' W^s alternately in a tile of their own and dq's; dA^s in
         SMEM (an A operand, and transposed, dA^s^T). The default at K = 128
         (`gla_grad_key_blocks`; 1.42 ms against the fused kernel's 4.38 on an H100, session 18,
         T = 2048): one CTA per 64-key block (dq, dk, dg are per key channel, so the blocks share
         nothing but dA, which each forms), the states read in two [64, 64] value blocks, and
         the tiles of the chunk part (v, do, the states) and of the levels in one aliased region
         (`plgpu.RefUnion`), as q, k and dg's staging tile: two CTAs per SM.

Registers. The six levels run as a loop (gates: over the levels; grad: over pairs of levels, the
two W^s tiles alternating), the level's block size a traced power of two (`Log2`): unrolled, ptxas
(`tools/ptxas_report.py`, K = V = 128) gave the gradient kernel 255 registers, 4.9 KB of spill
stores per thread and serialised wgmmas (C7512), and the gates kernel 456 B of spills; looped,
1.3 KB and no serialisation (the device's ptxas: 1.6 KB), and 104 B (0 at K = 64); the gradient
per key block (`gla_grad_key_blocks`) 0.9 KB.

Every wgmma A operand derived from an iota (the 0/1 span matrices, and dA^s, which the level's
pair mask cuts) is read from SMEM, never from registers: on the H200 such register operands gave
wrong rows (r + 8 of each warp's 16-row slab) in gates' q~ and grad's dq, dg (`Spans`;
tests/kernels/test_hopper_gla_operands.py checks it).

SMEM at K = V = 128: gates 105 KB (two CTAs per SM); walk 2 stages of 57 KB + 80 KB (the state
pass 3 stages of 33 KB + 33 KB); grad 217 KB (one CTA per SM: its loads are not overlapped with
compute; on the H200 it took 4.2 of gla's 5.6 ms fwd+bwd at T = 2048), per key block 105 KB
(two CTAs per SM). At K = V = 64: gates 57 KB, grad 153 KB.

Roofline at the anchor shapes (bf16, H = 16, K = V = 128, B T = 16384; H200 ~4.3 TB/s,
~790 TFLOP/s bf16). One [B, T, H, 128] bf16 tensor is 67 MB, g (float32, read as hi + lo bf16)
134 MB, A (bf16) 34 MB, the states of every chunk 134 MB.
  forward   gates: q, k, g in (268 MB), q~, k~, A, dec out (170 MB); walk: q~, k~, v, A in,
            o out (302 MB): 740 MB, 0.17 ms. FLOPs per chunk-head (K = 128): 4 chunk span
            products + 6 levels x (2 span + 1 pair) + the state products = 24 x 1.05 MFLOP:
            ~100 GFLOP, 0.13 ms; the levels' exponentials (one per key element and level:
            ~400 per thread per chunk) cost about as much again on the SFU.
  forward + backward   forward with states (+134 MB), reverse walk (k~, q~, do, A in; dv, dS
            out: 370 MB), grad (q, k, v, do, g, S, dS in; dq, dk, dg out: 740 MB): ~2 GB,
            0.46 ms; grad FLOPs ~45 x 1.05 MFLOP per chunk-head: 190 GFLOP, 0.25 ms.
The exact levels cost ~6x the tensor work of the single-reference form (Triton's "mild" chunks);
the kernels are first held to that roofline, not to the scalar gate's.

Inputs bf16 / fp16 (fp32 raises ValueError); K, V <= 128, zero-padded to 64 or 128 (zero key
channels and gates add nothing); T zero-padded to a multiple of 64 (zero gates: no decay, zero
keys and values: no contribution). Other shapes run on impl='pallas:triton' or impl='chunk'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.configs import HopperChunkConfig, multiprocessors
from linear_jax.kernels.gpu.hopper.common import (
    LANES,
    Ops,
    check_smem,
    chunk_vjp,
    enter_blocks,
    f32,
    interpreting,
    launch,
    launch_walk,
    mm_sum,
    pad_input,
    padded_doc,
    padded_inputs,
    piece_states,
    pl,
    plgpu,
    prod,
    send_states,
    smem,
    split_hi_lo,
    split_hi_lo_xla,
    stage_state,
    state_outputs,
    term,
    unpadded,
    walk_outputs,
    walk_piece,
    walk_results,
    walk_setup,
)

STATE_STAGES = 3        # the state pass holds k~, v, dec only
LEVELS = (32, 16, 8, 4, 2, 1)


# -- the chunk's spans: 0/1 matrices and masks ----------------------------------------------------
class Spans:
    """The 0/1 span matrices and pair masks of one chunk of C rows (module docstring), built from
    iotas in the accumulator layout. A matrix M [x, m] is applied as M @ g (x the output row, m
    the gate row); the gradient's routing applies its transpose.

    The span matrices reach the wgmma only through SMEM (`put`, then the tile as the A operand,
    ta=True for the transpose), never as a register A operand: on the H200 a wgmma whose A
    operand is an iota-derived 0/1 matrix held in registers gave wrong rows (r + 8 of each warp's
    16-row slab: q~ of the gates kernel and dq, dg of the gradient kernel), while the same
    matrices read from SMEM are exact. tests/kernels/test_hopper_gla_operands.py checks that no
    gla kernel has a register A operand derived from an iota."""

    def __init__(self, ops, C: int, dt):
        self.ops, self.C, self.dt = ops, C, dt
        self.r, self.c = ops.iota((C, C), 0), ops.iota((C, C), 1)

    def mat(self, cond):
        return jnp.where(cond, 1.0, 0.0).astype(self.dt)

    @staticmethod
    def put(ref, M):
        """M into the swizzled [C, C] tile ref (the caller commits before a wgmma reads it); the
        wgmmas that read ref before must have been awaited."""
        ref[...] = M

    def gin(self):
        """Gin_x = sum_{m <= x} g_m."""
        x, m = self.r, self.c
        return self.mat(m <= x)

    def rest(self):
        """R_x = sum_{m > x} g_m."""
        x, m = self.r, self.c
        return self.mat(m > x)

    def level(self, s):
        """Z^s: odd s-blocks sum from the block start to x, even ones from x + 1 to the end."""
        x, m = self.r, self.c
        same = _blk(x, s) == _blk(m, s)
        odd = _half(x, s) == 1
        return self.mat(same & jnp.where(odd, m <= x, m > x))

    def pairs(self, s):
        """[i, j]: the pairs of level s (i in the odd, j in the even half of one 2s block)."""
        r, c = self.r, self.c
        return ((_blk(r, _twice(s)) == _blk(c, _twice(s))) & (_half(r, s) == 1)
                & (_half(c, s) == 0))

    def odd_rows(self, s, shape):
        """[C, X] mask: the rows in odd s-blocks."""
        return _half(self.ops.iota(shape, 0), s) == 1


class Log2:
    """A level s = 2^e whose exponent e is traced (a loop over the levels): block indices by
    shifts."""

    def __init__(self, e):
        self.e = e


def _blk(x, s):
    if isinstance(s, Log2):
        return lax.shift_right_logical(x, jnp.full(x.shape, s.e, x.dtype))
    return lax.div(x, s)


def _half(x, s):
    """1 where x lies in an odd s-block, 0 in an even one."""
    return (_blk(x, s) & 1) if isinstance(s, Log2) else lax.rem(lax.div(x, s), 2)


def _twice(s):
    return Log2(s.e + 1) if isinstance(s, Log2) else 2 * s


class Docs:
    """The packed-document masks of one chunk from its rows (doc, din) [2, C] float32 in SMEM:
    same [C, C] (pairs in one document), in_rows / out_rows [C] row vectors (rows that read the
    entering / write the leaving state), keep [C] a column vector (the chunk holds no reset; the
    same on every entry). ref None: a single document (every mask None)."""

    def __init__(self, ops, ref, C: int):
        self.same = self.in_rows = self.out_rows = self.keep = None
        if ref is None:
            return
        shape = (C, C)
        r, c = ops.iota(shape, 0), ops.iota(shape, 1)
        d_row, d_col = ops.row(ref.at[0][...]), ops.col(ref.at[0][...])
        din_row, din_col = ops.row(ref.at[1][...]), ops.col(ref.at[1][...])
        last_row = jnp.sum(jnp.where(c == C - 1, ops.cols_of(d_col, shape), 0.0), axis=1)
        last_col = jnp.sum(jnp.where(r == C - 1, ops.rows_of(d_row, shape), 0.0), axis=0)
        self.same = ops.rows_of(d_row, shape) == ops.cols_of(d_col, shape)
        self.in_rows, self.out_rows = d_row == din_row, d_row == last_row
        self.keep = last_col == din_col

    @staticmethod
    def cut(mask, x, bcast=None):
        if mask is None:
            return x
        return jnp.where(mask if bcast is None else bcast(mask), x, 0.0)


def span_sum(M_ref, gh, gl, acc=None):
    """The `mm_sum` group of M (gh + gl) (M_ref: a 0/1 span matrix in an SMEM tile; None: no
    group)."""
    return None if M_ref is None else (acc, [term(M_ref, gh), term(M_ref, gl)])


def chunk_factors(ops, sp, docs, Gin, R, gh, gl, *, scale):
    """(scale exp(Gin) in, exp(R) out) [C, 64] and dec = keep exp(Gtot) [64] (a column vector)
    of one 64-key block from its sums Gin = L g, R = U g and gate halves gh / gl in SMEM."""
    C = sp.C
    tot = jnp.sum(ops.acc(gh[...]).astype(f32) + ops.acc(gl[...]).astype(f32), axis=0)
    rows = lambda m: ops.rows_of(m, (C, LANES))               # noqa: E731
    e_in = docs.cut(docs.in_rows, scale * jnp.exp(Gin), rows)
    e_out = docs.cut(docs.out_rows, jnp.exp(R), rows)
    return e_in, e_out, docs.cut(docs.keep, jnp.exp(tot))


def level_factors(sp, s, Z, q, k):
    """(Q^s, K^s, F) [C, 64] float32 of one key block from its span sums Z = Z^s: F = exp(Z),
    Q^s = q F on the odd rows, K^s = k F on the even rows (q, k float32 [C, 64])."""
    F = jnp.exp(Z)
    odd = sp.odd_rows(s, q.shape)
    return jnp.where(odd, q * F, 0.0), jnp.where(odd, 0.0, k * F), F


def mm_groups(ops, *groups):
    """`mm_sum` of the groups that are not None, results in place (None for the others): the
    products of one step and the span sums of the next are issued together, one wait for both."""
    live = [g for g in groups if g is not None]
    res = iter(mm_sum(ops, *live))
    return [None if g is None else next(res) for g in groups]


# -- forward: the chunk-parallel gate and intra kernel ---------------------------------------------
def gates(q, k, gh, gl, drows, *, scale, cfg):
    """(q~, k~ [B, Tp, H, K] in q's dtype, A [B, H, N, C, C] in q's dtype, dec
    [B, H, N, K/64, 64] float32) of the module docstring; gh, gl [B, Tp, H, K] the gate halves,
    drows None or [B, 2, Tp] float32 (doc, din)."""
    B, Tp, H, K = q.shape
    C, dt = cfg.chunk, q.dtype
    N, NKB = Tp // C, K // LANES
    ops = Ops(interpreting(cfg))
    has_doc = drows is not None

    def body(*refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None       # noqa: E731
        q_ref, k_ref, gh_ref, gl_ref, d_ref = pop(), pop(), pop(), pop(), pop(has_doc)
        qt_ref, kt_ref, a_ref, dec_ref = pop(), pop(), pop(), pop()
        qs, ks, ghs, gls, ds, xs, ys, as_, decs, bar = refs
        qo, ko = xs, ys                                   # where q~, k~ are staged for TMA
        b, h, n = (lax.axis_index(a) for a in ("b", "h", "n"))
        t = pl.ds(n * C, C)
        for src, dst in ((q_ref, qs), (k_ref, ks), (gh_ref, ghs), (gl_ref, gls)):
            plgpu.copy_gmem_to_smem(src.at[b, t, h], dst, bar.at[0])
        if has_doc:
            plgpu.copy_gmem_to_smem(d_ref.at[b, :, t], ds, bar.at[0])
        with jax.named_scope("gates_wait"):
            plgpu.barrier_wait(bar.at[0])
        sp = Spans(ops, C, dt)
        docs = Docs(ops, ds if has_doc else None, C)
        kblk = [pl.ds(i * LANES, LANES) for i in range(NKB)]
        diag = ops.row(jnp.zeros((C,), f32))

        # The span matrices go through the A tile as_ (free until A is written at the end), one
        # at a time: L, then U, then each level's W^s; every wgmma reading as_ is awaited before
        # the next matrix is put there (this keeps gates at its SMEM size, two CTAs per SM).
        def spans(M):                                     # M g per key block; M None: none
            if M is None:
                return [None] * NKB
            sp.put(as_, M)
            return [span_sum(as_, ghs.at[:, kr], gls.at[:, kr]) for kr in kblk]

        def span_sums(M):
            groups = spans(M)
            plgpu.commit_smem()
            return mm_groups(ops, *groups)

        level = lambda s: None if s is None else sp.level(s)    # noqa: E731
        with jax.named_scope("gates_chunk"):
            Gin, R = span_sums(sp.gin()), span_sums(sp.rest())
            for i, kr in enumerate(kblk):
                e_in, e_out, dec = chunk_factors(ops, sp, docs, Gin[i], R[i], ghs.at[:, kr],
                                                 gls.at[:, kr], scale=scale)
                qv = ops.acc(qs.at[:, kr][...]).astype(f32)
                kv = ops.acc(ks.at[:, kr][...]).astype(f32)
                qo[:, kr] = (qv * e_in).astype(dt)
                ko[:, kr] = (kv * e_out).astype(dt)
                decs[i] = dec
                diag = diag + jnp.sum(qv * kv, axis=1)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, qt_ref.at[b, t, h])
            plgpu.copy_smem_to_gmem(ko, kt_ref.at[b, t, h])
            plgpu.copy_smem_to_gmem(decs, dec_ref.at[b, h, n])
        A = jnp.where(sp.r == sp.c, ops.rows_of(diag, (C, C)), 0.0)
        with jax.named_scope("gates_levels"):
            Z = span_sums(level(LEVELS[0]))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)      # xs, ys are free again

            def step(lv, carry):     # level 2^e's pairs with the next level's spans (a loop, not
                A, Z = carry[0], list(carry[1:])      # unrolled: see `grad`); after the last
                e = len(LEVELS) - 1 - lv              # level the sums are level 1's, unused
                for i, kr in enumerate(kblk):
                    qv = ops.acc(qs.at[:, kr][...]).astype(f32)
                    kv = ops.acc(ks.at[:, kr][...]).astype(f32)
                    Qs, Ks, _ = level_factors(sp, Log2(e), Z[i], qv, kv)
                    xs[:, kr] = Qs.astype(dt)
                    ys[:, kr] = Ks.astype(dt)
                nxt = spans(sp.level(Log2(jnp.maximum(e - 1, 0))))
                plgpu.commit_smem()
                P, *Z = mm_groups(ops, (None, [term(xs, ys, tb=True)]), *nxt)
                return (A + jnp.where(sp.pairs(Log2(e)), P, 0.0), *Z)

            A = lax.fori_loop(0, len(LEVELS), step, (A, *Z))[0]
        with jax.named_scope("gates_store"):
            A = docs.cut(docs.same, A * scale)
            as_[...] = A.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(as_, a_ref.at[b, h, n])
        plgpu.wait_smem_to_gmem(0)

    scratch = [smem((C, K), dt), smem((C, K), dt), smem((C, K), dt), smem((C, K), dt),
               plgpu.SMEM((2, C), f32) if has_doc else plgpu.SMEM((1, C), f32),
               smem((C, K), dt), smem((C, K), dt), smem((C, C), dt),
               plgpu.SMEM((NKB, LANES), f32)]
    scratch += [plgpu.Barrier(num_arrivals=4 + has_doc, num_barriers=1)]
    check_smem("gla gates", scratch)
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, K), dt),
                jax.ShapeDtypeStruct((B, H, N, C, C), dt),
                jax.ShapeDtypeStruct((B, H, N, NKB, LANES), f32)]
    kernel = launch(body, cfg, ops, out_type=out_type, grid=(B, H, N), grid_names=("b", "h", "n"),
                    scratch=scratch, name="gla_gates", num_threads=1)
    args = (q, k, gh, gl) + ((drows,) if has_doc else ())
    return tuple(kernel(*args))


# -- the sequential walk ---------------------------------------------------------------------------
def walk(x, y, z, A, dec, s0, *, reverse, cfg, residuals=False, pieces=1, emit="out",
         final=True):
    """The chunk walk, forward (x = q~, y = k~, z = v) or reverse (x = k~, y = q~, z = do, A read
    transposed): out_n = A' z + x S_n,  S_n+1 = diag(dec_n) S_n + y^T z.

    A [B, H, N, C, C]; dec [B, H, N, K/64, 64] float32; s0 None (zeros) or float32 [B, H, K, V]
    (pieces == 1) or [B, H, P, K, V]. Grid (B, H, pieces) as `decay.walk`. emit "out": (out,
    the state after the piece that walks last (None unless `final`), the state each chunk read
    [B, H, N, K, V] in z's dtype (None unless `residuals`)); emit "state" (x, A unused): (each
    piece's end state from zero [B, H, P, K, V] float32, its total decay per key [B, H, P, K])."""
    out_mode, P = emit == "out", pieces
    B, Tp, H, K, V, C, dt, N, NW, NKB, L, stages = walk_setup(
        y, z, cfg, P, None if out_mode else STATE_STAGES)
    ops = Ops(interpreting(cfg))
    has_s0 = s0 is not None
    if has_s0 and s0.ndim == 4:
        s0 = s0[:, :, None]

    def body(*refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None       # noqa: E731
        x_ref, y_ref, z_ref, a_ref, d_ref, s0_ref = (pop(out_mode), pop(), pop(), pop(out_mode),
                                                     pop(), pop(has_s0))
        if out_mode:
            out_ref, send_ref, states_ref, dp_ref = pop(), pop(final), pop(residuals), None
        else:
            out_ref, send_ref, states_ref, dp_ref = None, pop(), None, pop()
        xs, ys, zs, as_, dcs = pop(out_mode), pop(), pop(), pop(out_mode), pop()
        st, os_, fs, dps = pop(out_mode), pop(out_mode), pop(), pop(not out_mode)
        in_bar, used_bar, own_bar = refs
        b, h, p, w, chunk, ends = walk_piece(P, L, reverse)

        def issue(step, slot):
            n = chunk(step)
            t = pl.ds(n * C, C)
            bar = in_bar.at[slot]
            if out_mode:
                plgpu.copy_gmem_to_smem(x_ref.at[b, t, h], xs.at[slot], bar)
                plgpu.copy_gmem_to_smem(a_ref.at[b, h, n], as_.at[slot], bar)
            plgpu.copy_gmem_to_smem(y_ref.at[b, t, h], ys.at[slot], bar)
            plgpu.copy_gmem_to_smem(z_ref.at[b, t, h], zs.at[slot], bar)
            plgpu.copy_gmem_to_smem(d_ref.at[b, h, n], dcs.at[slot], bar)

        @ops.walk_warpgroups(w, NW, (issue, L, stages, used_bar), w, NKB)
        def _consumer(vc, kblk):
            fw = fs.at[w]
            sw, ow = (st.at[w], os_.at[w]) if out_mode else (None, None)
            s0_at = (lambda kr: s0_ref.at[b, h, p, kr, vc]) if has_s0 else None
            S = enter_blocks(ops, s0_at, kblk, fw, own_bar.at[w], sw, dt)
            ones = ops.row(jnp.ones((LANES,), f32))
            carry = tuple(S) + ((ones,) * NKB if not out_mode else ())

            def step_fn(step, carry):
                S = list(carry[:NKB])
                n, slot = chunk(step), lax.rem(step, stages)
                yk, zv = ys.at[slot], zs.at[slot]
                plgpu.barrier_wait(in_bar.at[slot])
                decs = [ops.row(dcs.at[slot, i][...]) for i in range(NKB)]
                if out_mode:
                    t, xq = pl.ds(n * C, C), xs.at[slot]
                    if residuals:
                        plgpu.copy_smem_to_gmem(sw, states_ref.at[b, h, n, :, vc])
                updates = [(None, [term(yk.at[:, kr], zv.at[:, vc], ta=True)]) for kr in kblk]
                if out_mode:                              # o and the state update, one wait
                    o, *U = mm_sum(ops, (None, [term(as_.at[slot], zv.at[:, vc], ta=reverse),
                                                term(xq, sw)]), *updates)
                    plgpu.wait_smem_to_gmem(1 if residuals else 0, wait_read_only=True)
                    ow[...] = o.astype(dt)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(ow, out_ref.at[b, t, h, vc])
                else:
                    U = mm_sum(ops, *updates)
                S = [s * ops.rows_of(d, (LANES, LANES)) + u
                     for s, d, u in zip(S, decs, U, strict=True)]
                plgpu.barrier_arrive(used_bar.at[slot])
                if out_mode:
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    stage_state(S, sw, kblk)
                    return tuple(S)
                return tuple(S) + tuple(c * d for c, d in zip(carry[NKB:], decs, strict=True))

            carry = lax.fori_loop(0, L, step_fn, carry)
            send_states(carry, kblk, fw, (b, h, p, w, vc), send_ref, (dps, dp_ref),
                        out_mode=out_mode, final=final, ends=ends)

    out_type = (walk_outputs(B, Tp, H, K, V, N, dt, final=final, residuals=residuals) if out_mode
                else state_outputs(B, H, P, K, V, (NKB, LANES)))
    scratch = ([smem((stages, C, K), dt)] if out_mode else []) + [smem((stages, C, K), dt),
                                                                  smem((stages, C, V), dt)]
    scratch += [smem((stages, C, C), dt)] if out_mode else []
    scratch += [plgpu.SMEM((stages, NKB, LANES), f32)]
    if out_mode:
        scratch += [smem((NW, K, LANES), dt), smem((NW, C, LANES), dt)]
    scratch += [smem((NW, LANES, LANES), f32)]
    scratch += [] if out_mode else [plgpu.SMEM((NKB, LANES), f32)]
    check_smem("gla walk", scratch)
    kernel = launch_walk(body, cfg, ops, out_type=out_type, scratch=scratch, cells=(B, H, P, NW),
                         consumers=NW, copies=3 + 2 * out_mode, stages=stages, name="gla_walk",
                         reverse=reverse, out=out_mode)
    args = ((x,) if out_mode else ()) + (y, z) + ((A,) if out_mode else ()) + (dec,) + \
        ((s0,) if has_s0 else ())
    return walk_results(kernel(*args), out_mode=out_mode, final=final, residuals=residuals,
                        decay_rows=K)


# -- backward: the chunk-parallel gradient kernel --------------------------------------------------
def grad(q, k, v, do, gh, gl, drows, states, dstates, *, scale, cfg):
    """dq, dk (q's dtype, [B, Tp, H, K]) and dg (float32 [B, Tp, H, K]) from the inputs, the gate
    halves, the document rows and the walks' states S_n, dS_n+1 [B, H, N, K, V]. One CTA per
    (b, h, chunk) walking its 64-key blocks, or with `cfg.gla_grad_key_blocks` (K > 64) one CTA
    per (b, h, chunk, key block), its tiles aliased by phase (`_grad_scratch`)."""
    B, Tp, H, K = q.shape
    V, C, dt = v.shape[-1], cfg.chunk, q.dtype
    N, NKB, NVB = Tp // C, K // LANES, V // LANES
    ops = Ops(interpreting(cfg))
    has_doc = drows is not None
    split = cfg.gla_grad_key_blocks and NKB > 1
    blk = (C, LANES)

    def body(*refs):
        refs = list(refs)
        pop = lambda on=True: refs.pop(0) if on else None       # noqa: E731
        q_ref, k_ref, v_ref, do_ref, gh_ref, gl_ref = (pop() for _ in range(6))
        d_ref, s_ref, ds_ref = pop(has_doc), pop(), pop()
        dq_ref, dk_ref, dg_ref = pop(), pop(), pop()
        (qk, vs, dos, ghs, gls, ds, ss, dss, da_s, levels_tiles, oq, ok, og, vec, bar,
         tbar) = _grad_refs(refs, split)
        qs, ks = qk
        dal_s, ws, xs, ys, h0s, h1s = levels_tiles
        if split:
            b, n = lax.axis_index("b"), lax.axis_index("n")
            h, kb = lax.div(lax.axis_index("hk"), NKB), lax.rem(lax.axis_index("hk"), NKB)
            own = [pl.ds(kb * LANES, LANES)]          # the key columns of this CTA, in GMEM
        else:
            b, h, n = (lax.axis_index(a) for a in ("b", "h", "n"))
            own = [pl.ds(i * LANES, LANES) for i in range(NKB)]
        t = pl.ds(n * C, C)
        vcol = [pl.ds(j * LANES, LANES) for j in range(NVB)]

        def load_tiles(i, j=None):
            """S_n, dS_n+1 of key block i: every value column, or (split) value block j."""
            at = (b, h, n, own[i]) + (() if j is None else (vcol[j],))
            plgpu.copy_gmem_to_smem(s_ref.at[at], ss, tbar.at[0])
            plgpu.copy_gmem_to_smem(ds_ref.at[at], dss, tbar.at[0])

        keys = own[0] if split else slice(None)
        for src, dst, cols in ((q_ref, qs, keys), (k_ref, ks, keys), (v_ref, vs, slice(None)),
                               (do_ref, dos, slice(None)), (gh_ref, ghs, keys),
                               (gl_ref, gls, keys)):
            plgpu.copy_gmem_to_smem(src.at[b, t, h, cols], dst, bar.at[0])
        if has_doc:
            plgpu.copy_gmem_to_smem(d_ref.at[b, :, t], ds, bar.at[0])
        with jax.named_scope("grad_wait"):
            load_tiles(0, 0 if split else None)
            plgpu.barrier_wait(bar.at[0])
        sp = Spans(ops, C, dt)
        docs = Docs(ops, ds if has_doc else None, C)
        with jax.named_scope("grad_da"):
            dP = ops.dot(dos, vs, tb=True)
            causal = sp.r >= sp.c
            mask = causal if docs.same is None else causal & docs.same
            dA = jnp.where(mask, dP, 0.0)
            diag = jnp.sum(jnp.where(sp.r == sp.c, dA, 0.0), axis=1) * scale
            da_s[...] = dA.astype(dt)
            plgpu.commit_smem()
        load = lambda ref: ops.acc(ref[...]).astype(f32)               # noqa: E731

        def halves(x, a, b_):
            hi, lo = split_hi_lo(x, dt)
            a[...] = hi
            b_[...] = lo

        def levels(kr, gh, gl, dq, dk, dg):
            """The six levels of one key block: dq, dk and dg (with the routing of dGin by L^T
            from h0s, h1s and of dR by U^T from xs, ys first) accumulated. The levels run as a
            loop over their pairs (s, s / 2), not unrolled: the unrolled six spilled ~5 KB of
            registers per thread and serialised the wgmmas (ptxas C7512), the loop's body
            ~1.3 KB (`tools/ptxas_report.py`)."""
            wbuf = (ws, oq)                               # level s's W^s: wbuf[0] for s = 2^odd
            sp.put(wbuf[0], sp.level(LEVELS[0]))
            plgpu.commit_smem()
            dg, Z = mm_groups(ops, (dg, [term(oq, h0s, ta=True), term(oq, h1s, ta=True),
                                         term(ok, xs, ta=True), term(ok, ys, ta=True)]),
                              span_sum(wbuf[0], gh, gl))

            def step(s, W, nxt, s_next, dq, dk, dg, Z):
                dal_s[...] = jnp.where(sp.pairs(s), ops.acc(da_s[...]).astype(f32),
                                       0.0).astype(dt)    # dA^s: an SMEM operand, as dA^s^T
                Qs, Ks, F = level_factors(sp, s, Z, load(qs.at[:, kr]), load(ks.at[:, kr]))
                xs[...] = Qs.astype(dt)
                ys[...] = Ks.astype(dt)
                plgpu.commit_smem()
                dQ, dK = ops.mm(prod(dal_s, ys), prod(dal_s, xs, ta=True))
                dq = dq + (scale * F) * dQ
                dk = dk + (scale * F) * dK
                dZ = load(xs) * dQ + load(ys) * dK
                halves(scale * dZ, h0s, h1s)
                sp.put(nxt, sp.level(s_next))             # routed (W^s^T) with the next spans
                plgpu.commit_smem()
                dg, Z = mm_groups(ops, (dg, [term(W, h0s, ta=True), term(W, h1s, ta=True)]),
                                  span_sum(nxt, gh, gl))
                return dq, dk, dg, Z

            def pair(j, carry):      # levels 2^e, 2^(e-1); after the last pair the next sums
                e = 5 - 2 * j        # are level 1's again, unused
                carry = step(Log2(e), wbuf[0], wbuf[1], Log2(e - 1), *carry)
                return step(Log2(e - 1), wbuf[1], wbuf[0], Log2(jnp.maximum(e - 2, 0)), *carry)

            dq, dk, dg, _ = lax.fori_loop(0, len(LEVELS) // 2, pair, (dq, dk, dg, Z))
            return dq, dk, dg

        def state_products(i, gh, gl):
            """dq~ = do S_n^T, dk~ = v dS_n+1^T, Gin, R and <S_n, dS_n+1> per key (a column
            vector) of key block i, with L, U in oq, ok. Fused: one load of every value column
            (the next block's prefetched once these are read); split: value block by value
            block through [64, 64] tiles."""
            plgpu.barrier_wait(tbar.at[0])
            cols = (lambda ref, j: ref.at[:, vcol[j]]) if split else (lambda ref, j: ref)
            dqt, dkt, Gin, R = mm_groups(ops, (None, [term(cols(dos, 0), ss, tb=True)]),
                                         (None, [term(cols(vs, 0), dss, tb=True)]),
                                         span_sum(oq, gh, gl), span_sum(ok, gh, gl))
            # per load of ss, dss: the [64, 64] value blocks it holds
            loaded = [(ss, dss)] if split else [(ss.at[:, c], dss.at[:, c]) for c in vcol]
            ddec = ops.row(jnp.zeros((LANES,), f32))       # <S_n, dS_n+1> per key row
            for j in range(NVB if split else 1):
                if j:                 # the last block's tiles are read (commit: every thread)
                    plgpu.commit_smem()
                    load_tiles(0, j)
                    plgpu.barrier_wait(tbar.at[0])
                    dqt, dkt = mm_groups(ops, (dqt, [term(cols(dos, j), ss, tb=True)]),
                                         (dkt, [term(cols(vs, j), dss, tb=True)]))
                for s_, d_ in loaded:
                    ddec = ddec + jnp.sum(load(s_) * load(d_), axis=1)
            vec[0] = ddec                                 # to a column vector through SMEM
            plgpu.commit_smem()                           # also: ss, dss are read
            if not split and i + 1 < NKB:
                load_tiles(i + 1)
            return dqt, dkt, Gin, R, ops.col(vec.at[0][...])

        # The span matrices reach the wgmmas through SMEM only (`Spans`): L and U in the output
        # tiles oq, ok (free until dq, dk are staged at the block's end; rewritten per key block
        # once the previous block's stores have read them), the levels' W^s alternately in ws
        # (the one tile added for them: SMEM is full) and oq (free once L^T has routed dGin).
        # Each tile is rewritten only after every wgmma reading it was awaited.
        for i, out_cols in enumerate(own):
            kr = slice(None) if split else out_cols       # this block's columns in q, k, g tiles
            gh, gl = ghs.at[:, kr], gls.at[:, kr]
            with jax.named_scope("grad_block"):
                if i:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # oq, ok, og are read
                sp.put(oq, sp.gin())
                sp.put(ok, sp.rest())
                plgpu.commit_smem()
                dqt, dkt, Gin, R, ddec = state_products(i, gh, gl)
                e_in, e_out, dec = chunk_factors(ops, sp, docs, Gin, R, gh, gl, scale=scale)
                qv, kv = load(qs.at[:, kr]), load(ks.at[:, kr])
                dq = e_in * dqt
                dk = e_out * dkt
                dgin, dr = qv * dq, kv * dk
                dg = ops.cols_of(dec * ddec, blk)
                dq = dq + ops.rows_of(diag, blk) * kv
                dk = dk + ops.rows_of(diag, blk) * qv
                halves(dgin, h0s, h1s)       # (split: where v, do, S, dS were; all read above)
                halves(dr, xs, ys)
            with jax.named_scope("grad_levels"):
                dq, dk, dg = levels(kr, gh, gl, dq, dk, dg)
            with jax.named_scope("grad_store"):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last block's stores are out
                oq[...] = dq.astype(dt)
                ok[...] = dk.astype(dt)
                og[...] = dg                 # (split: where q, k were; read by the last level)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(oq, dq_ref.at[b, t, h, out_cols])
                plgpu.copy_smem_to_gmem(ok, dk_ref.at[b, t, h, out_cols])
                plgpu.copy_smem_to_gmem(og, dg_ref.at[b, t, h, out_cols])
        plgpu.wait_smem_to_gmem(0)

    scratch = _grad_scratch(C, K, V, dt, has_doc, split, aliased=not ops.interpret)
    check_smem("gla grad", scratch)
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, K), dt),
                jax.ShapeDtypeStruct((B, Tp, H, K), f32)]
    grid, names = ((B, H * NKB, N), ("b", "hk", "n")) if split else ((B, H, N), ("b", "h", "n"))
    kernel = launch(body, cfg, ops, out_type=out_type, grid=grid, grid_names=names,
                    scratch=scratch, name="gla_grad", num_threads=1)
    args = (q, k, v, do, gh, gl) + ((drows,) if has_doc else ()) + (states, dstates)
    return tuple(kernel(*args))


def _grad_scratch(C, K, V, dt, has_doc, split, *, aliased):
    """The gradient kernel's SMEM, in the order `_grad_refs` reads it. Fused (one CTA walks
    every key block): q, k, g halves [C, K], v, do [C, V], the key block's S_n, dS_n+1 [64, V],
    and every tile of its own: 217 KB at K = V = 128. Split (one key block per CTA): q, k, g
    halves [C, 64], S_n, dS_n+1 [64, 64] (one value block at a time), and the tiles of the two
    phases of the kernel in one region each (`plgpu.RefUnion`; separate in the interpreter, which
    cannot alias): v, do and the states (read by the chunk part) with the levels' six tiles
    (written from the chunk part's end on), q, k with dg's float32 staging tile (written after
    the last level read q, k): 105 KB, two CTAs per SM."""
    KW, SV = (LANES, LANES) if split else (K, V)
    blk = (C, LANES)
    rows = plgpu.SMEM((2, C), f32) if has_doc else plgpu.SMEM((1, C), f32)
    qk = (smem((C, KW), dt), smem((C, KW), dt))
    reads = (smem((C, V), dt), smem((C, V), dt), smem((LANES, SV), dt), smem((LANES, SV), dt))
    levels_tiles = (smem((C, C), dt), smem((C, C), dt)) + tuple(smem(blk, dt) for _ in range(4))
    g_halves = [smem((C, KW), dt), smem((C, KW), dt)]
    vec_bars = [plgpu.SMEM((1, LANES), f32),
                plgpu.Barrier(num_arrivals=6 + has_doc, num_barriers=1),
                plgpu.Barrier(num_arrivals=2, num_barriers=1)]
    if not split:      # q, k, v, do, gh, gl, rows, S, dS, dA, dA^s, W, x, y, h0, h1, dq, dk, dg
        return ([*qk, *reads[:2], *g_halves, rows, *reads[2:], smem((C, C), dt), *levels_tiles,
                 smem(blk, dt), smem(blk, dt), smem(blk, f32)] + vec_bars)
    union = plgpu.RefUnion if aliased else (lambda *trees: trees)
    return ([union(qk, smem(blk, f32)), union(reads, levels_tiles), *g_halves, rows,
             smem((C, C), dt), smem(blk, dt), smem(blk, dt)] + vec_bars)


def _grad_refs(refs, split):
    """The scratch refs of `_grad_scratch` as (qk, vs, dos, ghs, gls, ds, ss, dss, da_s,
    levels_tiles, oq, ok, og, vec, bar, tbar)."""
    if split:
        (qk, og), ((vs, dos, ss, dss), levels_tiles), ghs, gls, ds, da_s, oq, ok, *rest = refs
    else:
        qs, ks, vs, dos, ghs, gls, ds, ss, dss, da_s, *rest = refs
        qk, levels_tiles, (oq, ok, og, *rest) = (qs, ks), tuple(rest[:6]), rest[6:]
    vec, bar, tbar = rest
    return (qk, vs, dos, ghs, gls, ds, ss, dss, da_s, levels_tiles, oq, ok, og, vec, bar, tbar)


# -- the op ----------------------------------------------------------------------------------------
def doc_rows(doc, C: int):
    """[B, 2, Tp] float32: each token's document index and that of the token before its chunk."""
    B, Tp = doc.shape
    d = doc.reshape(B, Tp // C, C)
    din = jnp.concatenate([jnp.zeros_like(d[:, :1, :1]), d[:, :-1, -1:]], axis=1)
    return jnp.stack([d.reshape(B, Tp), jnp.broadcast_to(din, d.shape).reshape(B, Tp)],
                     axis=1).astype(f32)


@functools.cache
def _core(cfg: HopperChunkConfig, scale: float, has_doc: bool, has_h0: bool, P: int):
    """custom_vjp of (q, k, v, g, drows, h0) -> (o, S_end) on padded inputs."""

    def walk2(x, y, z, A, dec, s0, *, reverse, residuals, final):
        if P > 1:
            E, dp = walk(None, y, z, None, dec, None, reverse=reverse, cfg=cfg, pieces=P,
                         emit="state")
            s0 = piece_states(E, dp, s0, reverse=reverse)
        return walk(x, y, z, A, dec, s0, reverse=reverse, cfg=cfg, residuals=residuals,
                    pieces=P, final=final)

    def forward(q, k, v, g, drows, h0, residuals):
        gh, gl = split_hi_lo_xla(g, q.dtype)
        qt, kt, A, dec = gates(q, k, gh, gl, drows, scale=scale, cfg=cfg)
        o, S, states = walk2(qt, kt, v, A, dec, h0, reverse=False, residuals=residuals,
                             final=True)
        return (o, S), (q, k, v, gh, gl, drows, qt, kt, A, dec, states)

    def bwd(res, do, dS):
        q, k, v, gh, gl, drows, qt, kt, A, dec, states = res
        do = do.astype(v.dtype)
        dv, dh0, dstates = walk2(kt, qt, do, A, dec, dS, reverse=True, residuals=True,
                                 final=has_h0)
        dq, dk, dg = grad(q, k, v, do, gh, gl, drows, states, dstates, scale=scale, cfg=cfg)
        return dq, dk, dv, dg, None, dh0 if has_h0 else None

    return chunk_vjp(forward, bwd)


def gla(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size, config=None):
    """The op-level entry (the kernel registry's signature).

    q, k [B, T, H, K] (heads expanded), v [B, T, H, V], bf16 or fp16 (float32: ValueError);
    g [B, T, H, K] log decays <= 0 (any float dtype; used in float32, carried as two bf16 halves:
    16 mantissa bits); initial_state None or [B, H, K, V]; segment_ids None or [B, T]. K, V <= 128
    (zero-padded to 64 or 128: zero gates and keys are neutral), T padded to a multiple of 64
    (chunk_size does not change the kernels' chunk). Larger K or V, and float32 inputs, are
    refused (`common.accepts`): the registry then runs the Triton kernel or the chunk form.
    Returns (o [B, T, H, V] in v's dtype, S [B, H, K, V] float32), differentiable in q, k, v, g
    and initial_state.
    """
    device = jax.devices()[0]
    cfg = (config or HopperChunkConfig.default(device)).for_chunk(chunk_size)
    B, _, H, _ = q.shape
    C = cfg.chunk
    Tp, Kp, qkv, h0 = padded_inputs("gla", q, k, v, initial_state, C)
    gp = pad_input(g, Tp, Kp, f32)
    drows = None if segment_ids is None else doc_rows(padded_doc(segment_ids, Tp), C)
    P = cfg.pieces_for(B * H, Tp // C, multiprocessors(device))
    core = _core(cfg, float(scale), segment_ids is not None, h0 is not None, P)
    return unpadded(*core(*qkv, gp, drows, h0), q, v)
