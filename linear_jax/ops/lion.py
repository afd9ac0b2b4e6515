"""LION: full (bidirectional) linear attention as a bidirectional RNN (Afzal et al. 2025, "LION:
Linear Attention for Bidirectional Sequence Modeling"; arXiv 2502.16249).

Every query reads every key of its document through a symmetric decay mask:

    Y = Scale((Q K^T * scale) * M) V,      M_ij = exp(sum_{min(i,j) < s <= max(i,j)} g_s)

(Scale divides each row by its sum, `normalize=True`, as in LION; q, k should then be positive
features). g absent: LION-LIT (M = 1, the linear transformer); g constant in t: LION-D (RetNet's
Toeplitz mask lambda^|i-j|); g from the token: LION-S (selective, Mamba-2's gate). The decay
between i and j is the gates strictly after the earlier of the two up to the later one, so M is
symmetric (the backward direction uses the gate of the token after, as the LION code does).

Three forms, equal up to rounding (tests/ops/test_lion.py checks each against a float64 loop):
  "full"       the [T, T] masked attention matrix, O(T^2);
  "recurrent"  the bidirectional RNN: a forward scan S^F_i = exp(g_i) S^F_{i-1} + k_i v_i^T and a
               backward scan S^B_i = exp(g_{i+1}) S^B_{i+1} + k_i v_i^T, y_i = q_i^T (S^F_i +
               S^B_i) - (q_i . k_i) v_i (the diagonal is in both scans: subtracted once);
  "chunk"      the same two directions through simple GLA's chunk form;
  "auto"       "chunk". Normalising appends a column of ones to v: its output is the row sum.
A backward scan is the forward op on the time-reversed sequence with the gates shifted by one.

Contract: bidirectional, so there is no state to carry: returns `(o, None)` and takes no
`initial_state`. `segment_ids` isolate packed documents in both directions (the mask is zero
between documents; each scan resets where the id changes).
Shapes: q, k [B, T, Hk, K]; v [B, T, H, V]; g [B, T, H] (<= 0) or None; o [B, T, H, V] in v's
dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks
from linear_jax.ops.common.chunking import doc_index
from linear_jax.ops.common.gates import segsum
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.simple_gla import simple_gla

IMPLS = ("auto", "full", "recurrent", "chunk")


def lion_full(q, k, v, g, *, scale, segment_ids):
    """The attention-matrix form: q, k [B,T,H,K], v [B,T,H,V] float32 -> [B,T,H,V]."""
    B, T, H, _ = q.shape
    A = jnp.einsum("bihk,bjhk->bhij", q * scale, k, precision="highest")
    if g is not None:
        # lower triangle exp(segsum), mirrored: each span sum from the gates inside it
        low = jnp.exp(segsum(jnp.moveaxis(g, 1, 2)))                      # [B,H,T,T]
        A = A * (low + jnp.swapaxes(low, -1, -2) - jnp.eye(T))
    if segment_ids is not None:
        doc = doc_index(segment_ids)
        A = jnp.where((doc[:, :, None] == doc[:, None, :])[:, None], A, 0.0)
    return jnp.einsum("bhij,bjhv->bihv", A, v, precision="highest")


def lion_scans(q, k, v, g, *, scale, segment_ids, chunk_size, impl):
    """Forward + backward scans through `simple_gla(impl=impl)` minus the doubled diagonal."""
    rev = lambda x: None if x is None else jnp.flip(x, axis=1)
    kw = dict(scale=scale, chunk_size=chunk_size, impl=impl)
    o_f, _ = simple_gla(q, k, v, g, segment_ids=segment_ids, **kw)
    g_b = None if g is None else jnp.concatenate([g[:, 1:], jnp.zeros_like(g[:, :1])], 1)
    o_b, _ = simple_gla(rev(q), rev(k), rev(v), rev(g_b), segment_ids=rev(segment_ids), **kw)
    diag = scale * jnp.sum(q * k, axis=-1, keepdims=True) * v
    return o_f + jnp.flip(o_b, axis=1) - diag


def lion(q, k, v, g=None, *, normalize=True, eps=1e-6, scale=None, segment_ids=None,
         chunk_size=64, impl="auto"):
    """LION bidirectional linear attention. Returns `(o [B,T,H,V], None)`.

    `g [B, T, H]` log decays (None: LION-LIT); `normalize`: divide each row by its mask-weighted
    sum q_i . sum_j M_ij k_j (+ eps); `impl` one of "auto", "full", "recurrent", "chunk".
    """
    B, T, H, K, V = _checks.check_qkv("lion", q, k, v)
    if g is not None:
        _checks.check_gate("lion", "g", g, B, T, H)
        _checks.check_log_decay("g", g)
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    if impl not in IMPLS:
        raise ValueError(f"lion: impl must be one of {IMPLS}, got {impl!r}")
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    q, k = repeat_heads(f32(q), H), repeat_heads(f32(k), H)
    v_in = f32(v)
    if normalize:
        v_in = jnp.concatenate([v_in, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
    scale = default_scale(scale, K)
    if impl == "full":
        o = lion_full(q, k, v_in, f32(g), scale=scale, segment_ids=segment_ids)
    else:
        o = lion_scans(q, k, v_in, f32(g), scale=scale, segment_ids=segment_ids,
                       chunk_size=chunk_size, impl="chunk" if impl == "auto" else impl)
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
    return o.astype(v.dtype), None
