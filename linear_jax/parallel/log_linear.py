"""Sequence-parallel log-linear simple GLA (`linear_jax.ops.log_linear_simple_gla`; log-linear
Mamba-2 runs on it).

The state is the stack of L Fenwick level states [L, K, V] per head. Run from entering levels S_in
(last written at position p0 - 1 of the shard's first document), a shard's leaving levels and
outputs are affine in S_in:

    S_out = d P(M_end) S_in + N,       P(M)_ml = [m == max(l, M)]
    o_t   = o_loc_t + sum_l lambda_t^(max(l, M_t)) Q~_t^T S_in^(l)

with N, o_loc the shard's levels and outputs from zero levels, d = exp(sum of the shard's gates),
M_t = `fenwick.held_level(p0 - 1, p_t)` (content only moves up, to max(level, M)), M_end that of
the shard's last token, Q~_t = scale q_t exp(G_t) as for simple GLA (`linear_jax.parallel.decay`).
A reset inside the shard zeroes Q~ after it and the map (d = 0). The map is gathered as the
[L, L] matrix d P(M_end) ("levels" in `linear_jax.parallel.affine`): one all-gather forward of
(N, d P, boundary segment ids), one backward of dL/dS_in, as for simple GLA.

Levels of pairs depend on positions within the document, so a shard needs its tokens' positions
before its local pass: `positions` [B, T] (`fenwick.positions` of the whole sequence). Given a
mesh, they are computed from the global segment ids outside the `shard_map` (without packed
documents an iota; with them the compiler's cumulative max over the split ids, one int32 [B, T]
all-gather on the CPU mesh); no state-sized collective.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax import _compat, ops
from linear_jax.ops.common import fenwick
from linear_jax.ops.common.fenwick import FenwickState
from linear_jax.ops.common.heads import default_scale
from linear_jax.parallel.affine import affine_shard
from linear_jax.parallel.decay import DEFAULT_MODE, shard_map_of, shard_q
from linear_jax.parallel.mesh import specs, uses_kernel


def _at_least(lam, M):
    """lam [B,T,H,L] read at level max(l, M [B,T]) for each l -> [B,T,H,L]."""
    L = lam.shape[-1]
    to = jnp.maximum(jnp.arange(L), M[..., None])                            # [B,T,L]
    onehot = (to[..., None] == jnp.arange(L)).astype(jnp.float32)            # [B,T,L,L']
    return jnp.einsum("bthj,btlj->bthl", lam.astype(jnp.float32), onehot,
                      precision=lax.Precision.HIGHEST)


def levels_local(q, k, v, g, level_weights, positions, *, axis_name="seq", scale=None,
                 initial_state=None, segment_ids=None, chunk_size=64, impl="auto", config=None,
                 mode=DEFAULT_MODE):
    """The op on the local shard; call inside `shard_map`. `positions` [B,T_loc] (float or int)
    are the tokens' positions in their documents over the whole sequence; `initial_state` the
    levels [B,H,L,K,V] entering shard 0, or None. Returns (o [B,T_loc,H,V], the global final
    levels)."""
    B, _, _, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_weights.shape[-1]
    scale = default_scale(scale, K)
    kw = dict(scale=scale, chunk_size=chunk_size, impl=impl, config=config)

    def run(x, seg, S):
        q, k, v, g, lam, pos = x
        o, state = ops.log_linear_simple_gla(q, k, v, g, lam, segment_ids=seg,
                                             initial_state=FenwickState(S, pos[:, 0]), **kw)
        return o, state.levels

    def held(pos):
        p = jnp.round(pos).astype(jnp.int32)
        return fenwick.held_level(p[:, :1] - 1, p, L)                        # [B,T]

    def pre(x, seg):
        q, k, v, g, lam, pos = x
        o_loc, N = run(x, seg, _compat.zeros_varying((B, H, L, K, V), *x))
        d = shard_map_of("scalar", g, seg, (B, H))                            # [B,H]
        to = jnp.maximum(jnp.arange(L), held(pos)[:, -1:])                   # [B,L]
        Pm = (to[:, None, :] == jnp.arange(L)[None, :, None]).astype(jnp.float32)
        w_in = _at_least(lam, held(pos))
        return (o_loc, shard_q(q, g, H, scale, seg), w_in), N, d[..., None, None] * Pm[:, None]

    def post(x, seg, parts, S_in):
        o_loc, q_t, w_in = parts
        o = o_loc.astype(jnp.float32) + jnp.einsum(
            "bthl,bthk,bhlkv->bthv", w_in, q_t, S_in, precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32)
        return o.astype(x[2].dtype)

    x = (q, k, v, g, level_weights, positions.astype(jnp.float32))
    return affine_shard(pre, post, "levels", x, (B, H, L, K, V), initial_state, segment_ids,
                        axis_name=axis_name, mode=mode, rerun=run)


def log_linear_simple_gla(q, k, v, g, level_weights, *, axis_name="seq", mesh=None,
                          batch_axes=None, head_axes=None, scale=None, initial_state=None,
                          segment_ids=None, positions=None, chunk_size=64, impl="auto",
                          config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.log_linear_simple_gla` (mesh arguments as
    `linear_jax.parallel.simple_gla`); returns `(o, FenwickState)`, the global final state.

    Inside your own `shard_map` (`mesh=None`), pass `positions` [B, T_loc]: this shard's slice of
    `fenwick.positions(initial position, segment_ids, B, T)` over the whole sequence (they carry
    the initial state's position, which is not read there).
    """
    B, T = q.shape[:2]
    levels = None if initial_state is None else initial_state[0]
    kw = dict(scale=scale, chunk_size=chunk_size, impl=impl, config=config, mode=mode)
    if mesh is None:
        if positions is None:
            raise ValueError("log_linear_simple_gla: inside shard_map, pass `positions` "
                             "(fenwick.positions over the whole sequence, this shard's slice)")
        o, S = levels_local(q, k, v, g, level_weights, positions, axis_name=axis_name,
                            initial_state=levels, segment_ids=segment_ids, **kw)
        last = _compat.all_gather_same(positions[:, -1].astype(jnp.float32), axis_name)[-1]
        return o, FenwickState(S, last + 1)
    p0 = jnp.zeros((B,), jnp.int32) if initial_state is None else jnp.round(
        jnp.asarray(initial_state[1])).astype(jnp.int32)
    positions = fenwick.positions(p0, segment_ids, B, T)
    x_spec, seg_spec, state_spec = specs(mesh, axis_name, batch_axes, head_axes)
    n = mesh.shape[axis_name]
    if T % n:
        raise ValueError(f"the sequence length T={T} must be a multiple of the size {n} of the "
                         f"mesh axis {axis_name!r}")

    def body(q, k, v, g, lam, pos, levels, seg):
        return levels_local(q, k, v, g, lam, pos, axis_name=axis_name, initial_state=levels,
                            segment_ids=seg, **kw)

    in_specs = (x_spec, x_spec, x_spec, x_spec, x_spec, seg_spec,
                None if levels is None else state_spec,
                None if segment_ids is None else seg_spec)
    f = _compat.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, state_spec),
                          check=not uses_kernel("log_linear_simple_gla", impl, T // n, config))
    o, S = f(q, k, v, g, level_weights, positions, levels, segment_ids)
    return o, FenwickState(S, (positions[:, -1] + 1).astype(jnp.float32))
