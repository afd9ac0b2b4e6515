"""Sequence-parallel log-linear attention: `log_linear_simple_gla` (log-linear Mamba-2 runs on
it) and `log_linear_gated_delta_rule`.

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

Log-linear Gated DeltaNet writes u_t = beta_t (v_t - k_t^T exp(g_t) S_{t-1}), S = sum_l S^(l)
Gated DeltaNet's own state, and reads them through the levels. u is affine in the summed state
entering the shard, u = u_loc + U~ S_in, and one run of the delta rule's chunk values on
augmented inputs, v' = [v | 0], S0' = [0 | I] (`linear_jax.parallel.delta`), gives u' =
[u_loc | U~]; the shard's map of the summed state, [N | M], is simple GLA's state over (k, u')
from [0 | I]. So it runs two dependent exchanges: the summed state's ("matrix"), giving u, then
the levels' over (q, k, u): two all-gathers forward and two backward.

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
from linear_jax.ops.common.delta_chunk import chunk_delta_values
from linear_jax.ops.common.fenwick import FenwickState
from linear_jax.ops.common.heads import default_scale, repeat_heads
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


def _public(local, op, arrays, level_weights, *, axis_name, mesh, batch_axes, head_axes,
            initial_state, segment_ids, positions, impl, config, **kw):
    """`local(*arrays, level_weights, positions, ...)` inside the caller's `shard_map` or, with
    a mesh, in its own; returns (o, FenwickState)."""
    B, T = arrays[0].shape[:2]
    levels = None if initial_state is None else initial_state[0]
    kw.update(impl=impl, config=config)
    if mesh is None:
        if positions is None:
            raise ValueError(f"{op}: inside shard_map, pass `positions` (fenwick.positions over "
                             f"the whole sequence, this shard's slice)")
        o, S = local(*arrays, level_weights, positions, axis_name=axis_name,
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

    def body(arrays, lam, pos, levels, seg):
        return local(*arrays, lam, pos, axis_name=axis_name, initial_state=levels,
                     segment_ids=seg, **kw)

    in_specs = ((x_spec,) * len(arrays), x_spec, seg_spec,
                None if levels is None else state_spec,
                None if segment_ids is None else seg_spec)
    f = _compat.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, state_spec),
                          check=not uses_kernel(op, impl, T // n, config))
    o, S = f(tuple(arrays), level_weights, positions, levels, segment_ids)
    return o, FenwickState(S, (positions[:, -1] + 1).astype(jnp.float32))


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
    return _public(levels_local, "log_linear_simple_gla", (q, k, v, g), level_weights,
                   axis_name=axis_name, mesh=mesh, batch_axes=batch_axes, head_axes=head_axes,
                   initial_state=initial_state, segment_ids=segment_ids, positions=positions,
                   impl=impl, config=config, scale=scale, chunk_size=chunk_size, mode=mode)


def delta_values_local(k, v, g, beta, *, axis_name, initial_state, segment_ids, chunk_size,
                       mode):
    """Gated DeltaNet's written values u [B,T_loc,H,V] float32 from the summed state entering
    the shard (module docstring); `initial_state` the summed state entering shard 0 or None."""
    B, _, H, K = k.shape
    V = v.shape[3]

    def run(x, seg, S):
        k, v, g, beta = x
        u = chunk_delta_values(k.astype(jnp.float32), v.astype(jnp.float32), beta, g,
                               initial_state=S, segment_ids=seg, chunk_size=chunk_size)
        _, S = ops.simple_gla(k, k, u, g, initial_state=S, segment_ids=seg,
                              chunk_size=chunk_size, impl="chunk")
        return u, S

    def pre(x, seg):
        k, v, g, beta = x
        v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (K,), v.dtype)], axis=-1)
        S_aug = _compat.zeros_varying((B, H, K, V + K), *x) + jnp.concatenate(
            [jnp.zeros((K, V), jnp.float32), jnp.eye(K, dtype=jnp.float32)], axis=-1)
        u, S = run((k, v_aug, g, beta), seg, S_aug)
        return (u[..., :V], u[..., V:]), S[..., :V], S[..., V:]

    def post(x, seg, parts, S_in):
        u_loc, u_t = parts
        return u_loc + jnp.einsum("bthk,bhkv->bthv", u_t, S_in, precision=lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)

    u, _ = affine_shard(pre, post, "matrix", (k, v, g, beta), (B, H, K, V), initial_state,
                        segment_ids, axis_name=axis_name, mode=mode, rerun=run)
    return u


def delta_levels_local(q, k, v, g, beta, level_weights, positions, *, axis_name="seq",
                       scale=None, initial_state=None, segment_ids=None, chunk_size=64,
                       impl="auto", config=None, mode=DEFAULT_MODE):
    """Log-linear Gated DeltaNet on the local shard (arguments as `levels_local`, plus beta):
    the values u through the summed state's exchange, then the levels' over (q, k, u)."""
    H = v.shape[2]
    k = repeat_heads(k, H)
    S_sum = None if initial_state is None else initial_state.astype(jnp.float32).sum(2)
    u = delta_values_local(k, v, g, beta, axis_name=axis_name, initial_state=S_sum,
                           segment_ids=segment_ids, chunk_size=chunk_size, mode=mode)
    o, S = levels_local(q, k, u, g, level_weights, positions, axis_name=axis_name, scale=scale,
                        initial_state=initial_state, segment_ids=segment_ids,
                        chunk_size=chunk_size, impl=impl, config=config, mode=mode)
    return o.astype(v.dtype), S


def log_linear_gated_delta_rule(q, k, v, g, beta, level_weights, *, axis_name="seq", mesh=None,
                                batch_axes=None, head_axes=None, scale=None, initial_state=None,
                                segment_ids=None, positions=None, chunk_size=64, impl="auto",
                                config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.log_linear_gated_delta_rule` (arguments as
    `log_linear_simple_gla`, plus beta). The values u come from the delta rule's chunk form on
    every impl; `impl` picks the level pass's."""
    return _public(delta_levels_local, "log_linear_gated_delta_rule", (q, k, v, g, beta),
                   level_weights, axis_name=axis_name, mesh=mesh, batch_axes=batch_axes,
                   head_axes=head_axes, initial_state=initial_state, segment_ids=segment_ids,
                   positions=positions, impl=impl, config=config, scale=scale,
                   chunk_size=chunk_size, mode=mode)
