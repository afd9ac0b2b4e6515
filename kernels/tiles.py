"""Tile math of one chunk, written once for every backend: gate spans and their gradients, the
packed-document masks, the unit-lower-triangular (UT/WY) inverse.

Every function works on the tiles of one chunk of C rows, held in registers (Triton) or vregs
(Mosaic TPU), or on batched XLA arrays where it says so. Per-row scalars are 2-D: a column [C, 1]
(row i of the chunk) or a row [1, C]; `row`, `col` are the int32 iotas of a [C, C] tile. Both
lowerings take these shapes, masks of broadcasts, masked sums along either axis and matmuls; the
callers pass the matmuls to use:

  mask_dot(m, x): a 0/1 matrix m [M, C] times a float32 tile x [C, X], float32-accurate (Mosaic
    TPU: x split into three bf16 parts; Triton: 3xTF32 for float32 inputs, tf32 for bf16/fp16,
    whose own rounding is coarser).
  dot(a, b): a plain float32-accumulated product (the UT inverse).

What stays with each backend (and why it cannot be shared): how a chunk's tiles are read. The
Triton kernels read the public layout [B, T, H, X] in place, per-token scalars as [T] vectors of a
(batch, head) and the document index as absolute int32 ids; the TPU kernels read heads-major
[B, H, T, X] blocks and per-token scalars as [N, C] tables resident in VMEM (a [T, 1] array would
be padded to 128 lanes), documents as float32 ids relative to the entering one. The vector gate's
diagonal sub-chunk blocks walk their key columns differently as well: the Triton kernels loop over
columns with dynamic row loads, the TPU kernel unrolls them over row extractions.

Gate spans. A chunk with log decays g_s <= 0 (s = 0..C-1) needs, for query i and key j <= i,

    D_ij = sum_{j<s<=i} g_s,     Gin_i = sum_{s<=i} g_s,     R_j = sum_{s>j} g_s,     Gtot

(the decay between two rows, from the chunk start to a row, from a row to the chunk end, across
the chunk). Each is summed from exactly the gates inside its span: D = L @ (g masked to s > j) with
L the 0/1 lower triangle, Gin and R as masked sums of the chunk's gate row. Never as a difference
G_i - G_j of cumulative sums: that is exact in value but not in gradient. With P = dL/dD (the pair
gradients, P_ij = dA_ij * A_ij for an intra term A = (q k^T) * exp(D)) and the per-row gradients
dGin, dR, dGtot, the chain rule through the spans gives

    dg_s = sum_{i>=s, j<s} P_ij  +  sum_{i>=s} dGin_i  +  sum_{j<s} dR_j  +  dGtot

the first term as (U @ P) summed over j < s (U = L^T, a 0/1 product), the next two as masked sums:
each pair's and each row's gradient reaches exactly the gates of its span, and nothing is
subtracted. The difference form routes a pair's gradient to every gate twice, with opposite signs,
so the O(1) gradients of pairs with no decay between them (i = j) cancel only to rounding; at
strong decay (g = -20) the true dg is ~1e-9 of the other gradients and the rounding is all that is
left (measured: relative errors of 0.7 to 110 before the GPU kernels took this form). The vector
gate applies the same sums per key channel (`vector_gate_terms`, `vector_gate_grad`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def iotas(C: int):
    """(row, col) int32 [C, C]."""
    return lax.broadcasted_iota(jnp.int32, (C, C), 0), lax.broadcasted_iota(jnp.int32, (C, C), 1)


def to_row(x, row, col):
    """A column [C, 1] as a row [1, C] (a masked sum: no transpose, exact)."""
    return jnp.sum(jnp.where(row == col, x, 0.0), axis=0, keepdims=True)


# ---- packed documents ---------------------------------------------------------------------------

def doc_masks(dc, dr, row, col):
    """The masks of a chunk with packed documents (`linear_jax.ops.common.chunking.doc_masks`).

    dc [C, 1], dr [1, C]: every row's document index relative to the document entering the chunk
    (0: the entering one; documents only increase along a chunk), or None: a single document.
    Returns (same [C, C]: causal pairs in one document; in_rows [C, 1]: rows the entering state
    reaches; out_rows [C, 1]: rows in the chunk's last document, which write the leaving state;
    keep [1, 1]: the chunk holds no reset, so the entering state survives it), the last three None
    without documents.
    """
    causal = row >= col
    if dc is None:
        return causal, None, None, None
    last = jnp.max(dr, axis=1, keepdims=True)
    return causal & (dc == dr), dc == 0, dc == last, last == 0


# ---- scalar gate -------------------------------------------------------------------------------

def scalar_spans(gc, gr, row, col, mask_dot=None):
    """(D [C, C] (0 above the diagonal; None without mask_dot), Gin [C, 1], R [C, 1], Gtot [1, 1])
    of one chunk's gates, a column gc [C, 1] and a row gr [1, C] (module docstring)."""
    Gin = jnp.sum(jnp.where(col <= row, gr, 0.0), axis=1, keepdims=True)
    R = jnp.sum(jnp.where(col > row, gr, 0.0), axis=1, keepdims=True)
    Gtot = jnp.sum(gr, axis=1, keepdims=True)
    D = None
    if mask_dot is not None:
        D = mask_dot((row >= col).astype(F32), jnp.where(row > col, gc, 0.0))
    return D, Gin, R, Gtot


def scalar_gate_terms(gc, gr, masks, row, col, mask_dot=None):
    """Decay factors of one chunk from its gates (`scalar_spans`): (decay [C, C] = exp(D) on
    `same`, 0 elsewhere (None without mask_dot: a kernel that needs no pairs); e_in = exp(Gin)
    [C, 1], 0 off in_rows; e_out = exp(R) [C, 1], 0 off out_rows; a = exp(Gtot) [1, 1], 0 where
    the chunk holds a reset)."""
    D, Gin, R, Gtot = scalar_spans(gc, gr, row, col, mask_dot)
    decay = None if D is None else jnp.exp(jnp.where(masks[0], D, -jnp.inf))
    return (decay,) + masked_factors(masks, jnp.exp(Gin), jnp.exp(R), jnp.exp(Gtot))


def masked_factors(masks, e_in, e_out, a, factors=None):
    """The chunk factors (e_in, e_out, a) zeroed where the documents cut them: e_in off in_rows,
    e_out off out_rows, a where the chunk holds a reset (any None factor is left None).
    `factors`: the masks as 0/1 float32 factors (`doc_factors`), multiplied in place of a select
    (the same values for finite factors)."""
    _, in_rows, out_rows, keep = masks
    if in_rows is None:
        return e_in, e_out, a
    if factors is not None:
        cut = lambda m, x: None if x is None else x * m                      # noqa: E731
        return tuple(cut(m, x) for m, x in zip(factors, (e_in, e_out, a), strict=True))
    cut = lambda m, x: None if x is None else jnp.where(m, x, 0.0)
    return cut(in_rows, e_in), cut(out_rows, e_out), cut(keep, a)


def doc_factors(dc, dr):
    """`doc_masks`' in_rows [C, 1], out_rows [C, 1] and keep [1, 1] as 0/1 float32 factors from
    integer arithmetic alone (no boolean tile; dc, dr as there, indices that only increase along
    the chunk): 1 - min(d, 1) for the distances d = dc, last - dc, last. Triton may carry a
    tensor-core operand's layout up through the elementwise chain that forms it, the masks
    included, and cannot stage a boolean tile in shared memory (KDA's reverse state pass in
    bf16 failed to compile so); a factor built this way has no boolean to carry."""
    last = jnp.max(dr, axis=1, keepdims=True)
    one = lambda d: (1 - jnp.minimum(d, 1)).astype(F32)                      # noqa: E731
    return one(dc), one(last - dc), one(last)


def scalar_gate_grad(P, d_gin, d_r, d_tot, row, col, mask_dot):
    """dL/dg [C, 1] from the pair gradients P = dL/dD [C, C] (None: no pair term), dL/dGin and
    dL/dR [C, 1] and dL/dGtot [1, 1]: each a sum over the pairs / rows whose span holds s."""
    dg = jnp.sum(jnp.where(col >= row, to_row(d_gin, row, col), 0.0)
                 + jnp.where(col < row, to_row(d_r, row, col), 0.0), axis=1, keepdims=True)
    if P is not None:
        UP = mask_dot((row <= col).astype(F32), P)                        # sum_{i>=s} P_ij
        dg = dg + jnp.sum(jnp.where(col < row, UP, 0.0), axis=1, keepdims=True)
    return dg + d_tot


# ---- scalar gate, scan form (forward running sums only) -----------------------------------------
# The same spans and routes as above with no 0/1 product and no masked [C, C] sum per span: D as a
# running sum down each column, the pair routes as a running sum along each row then one masked
# sum down the columns. A forward scan only adds (partial sums of contiguous runs of its terms),
# so every entry is still a sum of exactly the terms of its span. Triton lowers lax.cumsum
# (forward only) to tt.scan; the reverse sums a route needs (over i >= s) become the masked column
# sum, and what is left is a shift of dg by one row, which the caller undoes (`roll_gate_grad`).

def scan_pair_spans(g, row, col):
    """D [C, C] (0 on and above the diagonal) from a chunk's gates g [C]: D_ij = sum_{j<s<=i} g_s,
    the gates below the diagonal summed down each column."""
    return lax.cumsum(jnp.where(row > col, g[:, None], 0.0), axis=0)


def scan_gate_grad(P, d_gin, d_r, d_tot, row, col):
    """The scalar gate's dL/dg one row early: u [C] with dg_s = u_{(s-1) mod C} (`roll_gate_grad`).

    P [C, C] the pair gradients dL/dD (None: no pairs; only i > j is read), d_gin, d_r [C] the
    per-row dL/dGin, dL/dR (None: zero), d_tot the scalar dL/dGtot (None: zero). With W_it =
    sum_{j<=t} P_ij (a running sum along row i),

        u_t = sum_{i>t} (W_it + d_gin_i) + sum_{j<=t} d_r_j + d_tot     (t < C - 1)
        u_{C-1} = sum_i d_gin_i + d_tot                                  (that is dg_0)

    so that u_{s-1} holds the pairs i >= s > j, the rows i >= s of d_gin and j < s of d_r: each
    term is added to exactly the gates of its span, none is subtracted."""
    C = row.shape[0]
    t = lax.broadcasted_iota(jnp.int32, (C,), 0)
    W = 0.0 if P is None else lax.cumsum(jnp.where(row > col, P, 0.0), axis=1)
    if d_gin is None:
        u = jnp.sum(jnp.where(row > col, W, 0.0), axis=0) if P is not None else jnp.zeros((C,), F32)
        first = 0.0
    else:
        u = jnp.sum(jnp.where(row > col, W + d_gin[:, None], 0.0), axis=0)
        first = jnp.sum(d_gin)
    rest = 0.0 if d_r is None else lax.cumsum(d_r, axis=0)
    u = u + jnp.where(t < C - 1, rest, first)
    return u if d_tot is None else u + d_tot


def roll_gate_grad(u, C):
    """dg [B, T, H] from the rows u [B, T, H] of `scan_gate_grad` (chunks of C rows along T):
    each chunk's rows rolled down by one (XLA; a copy, no arithmetic)."""
    B, T = u.shape[:2]
    return jnp.roll(u.reshape((B, T // C, C) + u.shape[2:]), 1, axis=2).reshape(u.shape)


# ---- vector gate (per key channel) ------------------------------------------------------------

def vector_gate_terms(g, masks, row, col, mask_dot, want_in=True, want_out=True):
    """(e_in = exp(Gin) [C, K], 0 off in_rows; e_out = exp(R) [C, K], 0 off out_rows; a =
    exp(Gtot) [1, K], 0 where the chunk holds a reset) of a chunk's vector gate g [C, K]; the
    factors not asked for are None. The intra pairs are built by sub-chunks (`kernels/gpu/intra.py`,
    `kernels/tpu/gla.py`)."""
    e_in = jnp.exp(mask_dot((row >= col).astype(F32), g)) if want_in else None
    e_out = jnp.exp(mask_dot((row < col).astype(F32), g)) if want_out else None
    return masked_factors(masks, e_in, e_out, jnp.exp(jnp.sum(g, axis=0, keepdims=True)))


def vector_gate_grad(d_gin, d_r, d_tot, row, col, mask_dot):
    """dL/dg [C, K] of the per-row terms: dL/dGin, dL/dR [C, K] and dL/dGtot [1, K]."""
    return (mask_dot((row <= col).astype(F32), d_gin) + mask_dot((row > col).astype(F32), d_r)
            + d_tot)


# ---- the UT / WY inverse ------------------------------------------------------------------------

def strictly_lower(row, col):
    """The 0/1 float32 factor of row > col, from integer arithmetic alone (no boolean tile):
    min(max(row - col, 0), 1)."""
    return jnp.minimum(jnp.maximum(row - col, 0), 1).astype(F32)


def unit_lower_inverse(L, row, col, dot, float_masks: bool = False):
    """(I + L)^{-1} for strictly lower-triangular L [..., C, C] (C a power of two), by recursive
    doubling: with X the inverse of the diagonal blocks of size b, the inverse over blocks of 2b is
    X - X M X, M the part of L coupling the two halves of each 2b block (exact: M X M = 0). b = 1,
    2, 4, ... < C: 2 log2(C) [C, C] products, no row-by-row work, so the same code runs on the MXU,
    the tensor cores and batched in XLA. Accuracy (float32, unit keys, beta in [0, 2], key
    correlation 0 to 0.99, against a float64 inverse): 2e-8 to 1.2e-6 relative, 1.1-2.4x the row
    substitution's error at C = 16 to 128.

    `float_masks`: the identity and the block masks as 0/1 float32 factors from integer arithmetic
    (M = L * mask), no boolean tile anywhere: the Triton kernels whose L is elementwise in loaded
    tiles (KDA's, from Akk) take it, since Triton may move the tensor-core operand layout of M up
    through the whole elementwise chain, the masks included, and stage a boolean tile in shared
    memory, which it cannot compile. The same values as the select for finite L (a masked
    negative entry gives -0.0 in place of 0.0; the products and X are unchanged)."""
    C = L.shape[-1]
    if float_masks:
        X = (1 - jnp.minimum(row ^ col, 1)).astype(F32)
    else:
        X = (row == col).astype(F32)
    size = 1
    while size < C:
        sh = size.bit_length() - 1
        if float_masks:
            # same 2b block, different b halves: (row ^ col) >> sh == 1,
            # as min(f, 1) - min(f >> 1, 1)
            f = lax.shift_right_logical(row ^ col, sh)
            M = L * (jnp.minimum(f, 1) - jnp.minimum(lax.shift_right_logical(f, 1), 1)).astype(F32)
        else:
            pair = lax.shift_right_logical(row, sh + 1) == lax.shift_right_logical(col, sh + 1)
            split = lax.shift_right_logical(row, sh) != lax.shift_right_logical(col, sh)
            M = jnp.where(pair & split, L, 0.0)
        X = X - dot(X, dot(M, X))
        size *= 2
    return X
