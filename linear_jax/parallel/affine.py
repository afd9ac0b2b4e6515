"""Sequence parallelism for any op that is affine in the state entering a shard.

Shard p of P holds a contiguous slice of the sequence. For every op here, run from an entering
state S_in, the shard's outputs and leaving state are

    O = O_loc + Q~ S_in,        S_out = M S_in + N

(`docs/sequence_parallel.md`, the design note SEQUENCE_PARALLEL.md §2). An op supplies two
local functions: `pre(x, seg) -> (parts, N, M)`, its one local pass from a zero state, and
`post(x, seg, parts, S_in) -> O`, linear in S_in (the correction GEMM O_loc + Q~ S_in, or, staged,
ZeCO's elementwise fix of the chunk states). This module does the rest:

forward   one all-gather of (M, N, first/last segment id) packed in one buffer; every device
          scans the P affine maps in sequence order from the initial state (fp32), with a reset
          where a document starts exactly at a shard boundary; S_in = entering state of this shard.
backward  one all-gather of D = dL/dS_in as seen by `post` (= Q~^T dO); the reverse scan
          Lam_{p-1} = D_p + M_p^T Lam_p (reset at boundaries) gives the cotangent Lam_p of each
          shard's leaving state; then the local backward with cotangents (dO, Lam_p).

The local backward has two forms (`mode`):
  "saved"     the transpose of the forward's own linearization of `pre` and `post` (its residuals
              kept, nothing recomputed), with cotangents dN = Lam, dM = Lam S_in^T.
  "rerun"     the ordinary single-device VJP of the op run from S_in (design note §4): it reruns
              the local forward inside the backward unless the op's own VJP avoids that.
  "autodiff"  no custom VJP: JAX differentiates through the collectives (the reference; its
              transpose of the gather is a reduce-scatter and its backward runs through `pre`).

M comes in five kinds: "identity" (no decay), "scalar" [B,H], "vector" [B,H,K] (a diagonal),
"matrix" [B,H,K,K], and "levels" [B,H,L,L] acting on a stack of L states [B,H,L,K,V] (log-linear
attention's Fenwick levels, `linear_jax.parallel.log_linear`). The initial state is replicated
along the axis and applies on shard 0; the final state is the global one, the same on every device
of the axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax import _compat

_HI = lax.Precision.HIGHEST
MODES = ("saved", "rerun", "autodiff")


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HI, preferred_element_type=jnp.float32)


def apply_map(kind, M, S):
    """M S for a state S [B,H,K,V] ([B,H,L,K,V] for "levels")."""
    if kind == "identity":
        return S
    if kind == "scalar":
        return M[..., None, None] * S
    if kind == "vector":
        return M[..., :, None] * S
    if kind == "levels":
        return _einsum("bhml,bhlkv->bhmkv", M, S)
    return _einsum("bhkj,bhjv->bhkv", M, S)


def apply_map_t(kind, M, L):
    """M^T L."""
    if kind == "matrix":
        return _einsum("bhjk,bhjv->bhkv", M, L)
    if kind == "levels":
        return _einsum("bhml,bhmkv->bhlkv", M, L)
    return apply_map(kind, M, L)


def map_cotangent(kind, L, S):
    """dM of S_out = M S + N given dS_out = L (None for the identity)."""
    if kind == "identity":
        return None
    if kind == "scalar":
        return jnp.sum(L * S, axis=(-2, -1))
    if kind == "vector":
        return jnp.sum(L * S, axis=-1)
    if kind == "levels":
        return _einsum("bhmkv,bhlkv->bhml", L, S)
    return _einsum("bhkv,bhjv->bhkj", L, S)


def _pack(arrays):
    """One float32 vector from several arrays (ints bitcast), and the recipe to undo it."""
    flat, recipe = [], []
    for a in arrays:
        if jnp.issubdtype(a.dtype, jnp.integer):
            f = lax.bitcast_convert_type(a.astype(jnp.int32), jnp.float32)
        else:
            f = a.astype(jnp.float32)
        flat.append(f.reshape(-1))
        recipe.append((a.shape, a.dtype))
    return jnp.concatenate(flat), recipe


def _unpack(buf, recipe):
    """buf [P, n] -> arrays [P, *shape]."""
    out, i = [], 0
    for shape, dtype in recipe:
        n = 1
        for d in shape:
            n *= d
        x = buf[:, i: i + n].reshape((buf.shape[0],) + tuple(shape))
        if jnp.issubdtype(dtype, jnp.integer):
            x = lax.bitcast_convert_type(x, jnp.int32)
        out.append(x)
        i += n
    return out


def gather_maps(kind, M, N, seg_ends, axis_name):
    """All-gathers the shard maps in one collective. Returns Ms [P,...] (None for the identity),
    Ns [P,B,H,...] and resets [P,B] (bool: the carry is zeroed entering shard p) or None."""
    arrays = [N] + ([] if kind == "identity" else [M]) + ([] if seg_ends is None else [seg_ends])
    buf, recipe = _pack(arrays)
    parts = _unpack(_compat.all_gather_same(buf, axis_name), recipe)
    Ns = parts.pop(0)
    Ms = None if kind == "identity" else parts.pop(0)
    resets = None
    if seg_ends is not None:
        ends = parts.pop(0)                                     # [P, B, 2]: first, last id
        prev_last = jnp.concatenate([ends[:1, :, 0], ends[:-1, :, 1]], axis=0)
        resets = ends[:, :, 0] != prev_last                     # never at shard 0
    return Ms, Ns, resets


def _zero_where(r, S):
    return S if r is None else jnp.where(r.reshape((-1,) + (1,) * (S.ndim - 1)), 0.0, S)


def scan_states(kind, Ms, Ns, resets, S0):
    """Entering states [P,B,H,...] and the final state, in float32, the same on every device."""
    P = Ns.shape[0]
    S, ents = S0, []
    for p in range(P):        # P is small and static: unrolled, no sequential loop in the HLO
        if p:
            S = _zero_where(None if resets is None else resets[p], S)
        ents.append(S)
        S = apply_map(kind, None if Ms is None else Ms[p], S) + Ns[p]
    return jnp.stack(ents), S


def scan_cotangents(kind, Ms, Ds, resets, dS_final):
    """Reverse scan: cotangents of each shard's leaving state [P,...] and of the initial state."""
    P = Ds.shape[0]
    L, lams = dS_final, [None] * P
    for p in reversed(range(P)):
        lams[p] = L
        L = Ds[p] + apply_map_t(kind, None if Ms is None else Ms[p], L)
        if p:
            L = _zero_where(None if resets is None else resets[p], L)
    return jnp.stack(lams), L


def seg_ends_of(segment_ids):
    return None if segment_ids is None else jnp.stack(
        [segment_ids[:, 0], segment_ids[:, -1]], axis=-1).astype(jnp.int32)


def _forward(pre, post, kind, x, seg, S0, axis_name):
    parts, N, M = pre(x, seg)
    Ms, Ns, resets = gather_maps(kind, M, N, seg_ends_of(seg), axis_name)
    ents, S_final = scan_states(kind, Ms, Ns, resets, S0)
    S_in = ents[lax.axis_index(axis_name)]
    return post(x, seg, parts, S_in), S_final


def affine_shard(pre: Callable, post: Callable, kind: str, x, state_shape, initial_state,
                 segment_ids, *, axis_name: str, mode: str = "saved",
                 rerun: Callable | None = None):
    """Runs an affine op over the shards of `axis_name`; call inside `shard_map`.

    x: pytree of local float inputs (differentiated); state_shape (B,H,K,V) of N (or
    (B,H,L,K,V)); initial_state
    of that shape or None (replicated along the axis); segment_ids [B,T_loc] or None, passed on
    to the local functions (which must not close over traced values: the backward is traced
    apart from the forward). `rerun(x, seg, S_in) -> (O, S_out)` is the op run from a state
    (needed for mode="rerun"). Returns (O, S_final).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # a missing initial state is zeros split like the batch (not along the sequence axis), so its
    # cotangent has the type of a user's initial state
    S0 = (_compat.zeros_varying(state_shape, *jax.tree.leaves(x), exclude=(axis_name,))
          if initial_state is None else initial_state.astype(jnp.float32))
    if mode == "autodiff":
        return _forward(pre, post, kind, x, segment_ids, S0, axis_name)

    @jax.custom_vjp
    def run(x, seg, S0):
        return _forward(pre, post, kind, x, seg, S0, axis_name)

    def fwd(x, seg, S0):
        if mode == "saved":
            (parts, N, M), pre_vjp = jax.vjp(lambda x: pre(x, seg), x)
        else:
            (parts, N, M), pre_vjp = pre(x, seg), None
        Ms, Ns, resets = gather_maps(kind, M, N, seg_ends_of(seg), axis_name)
        ents, S_final = scan_states(kind, Ms, Ns, resets, S0)
        S_in = ents[lax.axis_index(axis_name)]
        if mode == "saved":
            O, post_vjp = jax.vjp(lambda x, p, s: post(x, seg, p, s), x, parts, S_in)
        else:
            O, post_vjp = post(x, seg, parts, S_in), None
        kept = None if mode == "saved" else parts
        return (O, S_final), (x, seg, S_in, Ms, resets, pre_vjp, post_vjp, kept)

    def bwd(res, cts):
        x, seg, S_in, Ms, resets, pre_vjp, post_vjp, parts = res
        dO, dS_final = cts
        if mode == "saved":
            dx_post, dparts, D = post_vjp(dO)
        else:
            # only the Q~ S_in term of `post` reaches D; XLA drops the rest of `parts`
            D = jax.vjp(lambda s: post(x, seg, parts, s), S_in)[1](dO)[0]
        D, dS_final = D.astype(jnp.float32), dS_final.astype(jnp.float32)
        checked = axis_name in _compat.varying_axes(S_in)
        if checked:
            Ds = _compat.all_gather_same(D, axis_name)
        else:
            # no vma types: shard_map splits the cotangent of the replicated final state among
            # the devices, so its sum rides along in the same gather
            buf, recipe = _pack([D, dS_final])
            Ds, dS_finals = _unpack(_compat.all_gather_same(buf, axis_name), recipe)
            dS_final = dS_finals.sum(0)
        lams, dS0 = scan_cotangents(kind, Ms, Ds, resets, dS_final)
        idx = lax.axis_index(axis_name)
        lam = lams[idx]
        if mode == "saved":
            dM = map_cotangent(kind, lam, S_in)
            (dx_pre,) = pre_vjp((dparts, lam, dM))
            dx = jax.tree.map(jnp.add, dx_pre, dx_post)
        else:
            _, vjp = jax.vjp(lambda x, s: rerun(x, seg, s), x, S_in)
            dx, _ = vjp((dO, lam))
        if not checked:
            # and sums the cotangent of a replicated input over the axis: shard 0 reports it
            dS0 = jnp.where(idx == 0, dS0, 0.0)
        return dx, None, dS0

    run.defvjp(fwd, bwd)
    return run(x, segment_ids, S0)
