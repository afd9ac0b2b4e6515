"""Sequence-parallel Mamba-3 (`linear_jax.ops.mamba3`): a halo for the trapezoid, an affine map
for the state.

The op's state is (S, k_last, v_last). The last key and value are data, not recurrence: shard p
needs those of shard p-1's last token, which one `ppermute` sends (shard 0 takes the caller's; a
document starting exactly at a shard's first token drops them, as the op itself does at a reset).
Given them, S is affine in the entering state, S_out = N + M S_in and O = O_loc + Q~ S_in with M
[N, N] (the product of the shard's decays and rotations), and all four come from one run of the
single-device op on augmented values and state, as for the delta rule
(`linear_jax.parallel.rank_one.row_shard`): v' = [v | 0], S0' = [0 | I], v_last' = [v_last | 0].
The affine machinery is `linear_jax.parallel.affine`; the final (k_last, v_last) are the last
shard's, gathered so that every device returns the global final state.

MIMO (`linear_jax.ops.mamba3_mimo`) is SISO over 3r sub-steps per step, which only read the
previous step's keys and values: the same halo (of the r keys and values) gives them, and the
sub-steps of a shard's steps are then a contiguous shard of SISO's sequence, run as above.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax import _compat, ops
from linear_jax.ops.common.heads import repeat_heads
from linear_jax.ops.mamba3_mimo import step_outputs, substeps
from linear_jax.parallel.decay import DEFAULT_MODE
from linear_jax.parallel.mesh import run_on_mesh
from linear_jax.parallel.rank_one import row_shard


def _halo(k, v, segment_ids, initial_state, axis_name):
    """(k_last, v_last) entering this shard: the previous shard's last token's, or the caller's
    on shard 0; zero where a document starts at this shard's first token."""
    B, _, H, N = k.shape
    P = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    tail = jnp.concatenate([k[:, -1], v[:, -1]], axis=-1).astype(jnp.float32)   # [B, H, N+V]
    if segment_ids is not None:
        last = lax.bitcast_convert_type(segment_ids[:, -1].astype(jnp.int32), jnp.float32)
        tail = jnp.concatenate([tail, jnp.broadcast_to(last[:, None, None], (B, H, 1))], -1)
    halo = lax.ppermute(tail, axis_name, [(i, i + 1) for i in range(P - 1)])
    k_h, v_h = halo[..., :N], halo[..., N:N + v.shape[-1]]
    if segment_ids is not None:
        prev_last = lax.bitcast_convert_type(halo[:, 0, -1], jnp.int32)
        fresh = (segment_ids[:, 0].astype(jnp.int32) != prev_last)[:, None, None]
        k_h, v_h = jnp.where(fresh, 0.0, k_h), jnp.where(fresh, 0.0, v_h)
    if initial_state is None:
        return jnp.where(idx == 0, 0.0, k_h), jnp.where(idx == 0, 0.0, v_h)
    return (jnp.where(idx == 0, initial_state[1].astype(jnp.float32), k_h),
            jnp.where(idx == 0, initial_state[2].astype(jnp.float32), v_h))


def mamba3_local(q, k, v, g, dt, trap, theta, *, axis_name="seq", scale=1.0, initial_state=None,
                 segment_ids=None, chunk_size=64, impl="auto", config=None, mode=DEFAULT_MODE):
    """`ops.mamba3` on the local shard of a sequence split along `axis_name`; call inside
    `shard_map`. Returns (o [B,T_loc,H,P], the global final state (S, k_last, v_last))."""
    B, N = q.shape[0], q.shape[3]
    H, V = v.shape[2], v.shape[3]
    kw = dict(scale=scale, chunk_size=chunk_size, impl=impl, config=config)
    k_h, v_h = _halo(repeat_heads(k, H), v, segment_ids, initial_state, axis_name)

    def run(x, S0, seg, pad):
        *arrays, k_h, v_h = x
        o, (S, _, _) = ops.mamba3(*arrays[:2], pad(arrays[2]), *arrays[3:],
                                  initial_state=(S0, k_h, pad(v_h)), segment_ids=seg, **kw)
        return o, S

    x = (q, k, v, g, dt, trap, theta, k_h, v_h)
    S0 = None if initial_state is None else initial_state[0]
    o, S = row_shard(run, x, (B, H, N, V), S0, segment_ids, axis_name=axis_name, mode=mode)
    last = jnp.concatenate([repeat_heads(k, H)[:, -1], v[:, -1]], -1).astype(jnp.float32)
    last = _compat.all_gather_same(last, axis_name)[-1]
    return o, (S, last[..., :N], last[..., N:])


def _sharded(local, x, *, mesh, axis_name, batch_axes, head_axes, initial_state, segment_ids,
             **kw):
    """`local(*x)` (`mamba3_local`, `mimo_local`), under `shard_map` over `mesh` when one is
    given; both run `ops.mamba3`, whose kernels decide the `shard_map` checks."""
    if mesh is None:
        return local(*x, axis_name=axis_name, initial_state=initial_state,
                     segment_ids=segment_ids, **kw)
    return run_on_mesh(lambda *x, **a: local(*x, **a, **kw), mesh, x,
                       initial_state=initial_state, segment_ids=segment_ids, seq_axis=axis_name,
                       batch_axes=batch_axes, head_axes=head_axes,
                       kernel_op=("mamba3", kw["impl"], kw["config"]))


def mamba3(q, k, v, g, dt, trap, theta, *, axis_name="seq", mesh=None, batch_axes=None,
           head_axes=None, scale=1.0, initial_state=None, segment_ids=None, chunk_size=64,
           impl="auto", config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.mamba3` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return _sharded(mamba3_local, (q, k, v, g, dt, trap, theta), mesh=mesh, axis_name=axis_name,
                    batch_axes=batch_axes, head_axes=head_axes, scale=scale,
                    initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                    impl=impl, config=config, mode=mode)


def mimo_local(q, k, v, g, dt, trap, theta, *, axis_name="seq", scale=1.0, initial_state=None,
               segment_ids=None, chunk_size=64, impl="auto", config=None, mode=DEFAULT_MODE):
    """`ops.mamba3_mimo` on the local shard; call inside `shard_map`. Returns (o [B,T_loc,H,r,P],
    the global final state (S, k_last [B,H,r,N], v_last [B,H,r,P]))."""
    B, T, _, r, N = q.shape
    H, P = v.shape[2], v.shape[4]
    f32 = lambda x: x.astype(jnp.float32)
    q, k = repeat_heads(f32(q), H), repeat_heads(f32(k), H)
    flat = lambda x: x.reshape(x.shape[:3] + (-1,))              # the r keys (values) as one
    init = None if initial_state is None else (
        initial_state[0], initial_state[1].reshape(B, H, -1), initial_state[2].reshape(B, H, -1))
    k0, v0 = _halo(flat(k), flat(f32(v)), segment_ids, init, axis_name)
    args, seg = substeps(q, k, f32(v), *(f32(x) for x in (g, dt, trap, theta)),
                         k0.reshape(B, H, r, N), v0.reshape(B, H, r, P), segment_ids)
    zeros = lambda n: _compat.zeros_varying((B, H, n), *args)
    S0 = None if initial_state is None else (initial_state[0], zeros(N), zeros(P))
    o, (S, _, _) = mamba3_local(*args, axis_name=axis_name, scale=scale, initial_state=S0,
                                segment_ids=seg, chunk_size=chunk_size, impl=impl,
                                config=config, mode=mode)
    last = jnp.concatenate([flat(k)[:, -1], flat(f32(v))[:, -1]], -1)
    last = _compat.all_gather_same(last, axis_name)[-1]
    return step_outputs(o, r), (S, last[..., :r * N].reshape(B, H, r, N),
                                last[..., r * N:].reshape(B, H, r, P))


def mamba3_mimo(q, k, v, g, dt, trap, theta, *, axis_name="seq", mesh=None, batch_axes=None,
                head_axes=None, scale=1.0, initial_state=None, segment_ids=None, chunk_size=64,
                impl="auto", config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.mamba3_mimo` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return _sharded(mimo_local, (q, k, v, g, dt, trap, theta), mesh=mesh, axis_name=axis_name,
                    batch_axes=batch_axes, head_axes=head_axes, scale=scale,
                    initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                    impl=impl, config=config, mode=mode)
