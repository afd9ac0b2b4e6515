"""Sequence-parallel forms of the ops whose transition is a full [K, K] matrix acting on the rows
of the state: `kda` ((I - beta k k^T) diag(exp(g))) and `rwkv7` (diag(exp(g)) + b a^T); the delta
rule's (`linear_jax.parallel.delta`) and Mamba-3's (`linear_jax.parallel.mamba3`) run on the same
shard (`row_shard`).

A shard run from S_in gives O = O_loc + Q~ S_in and S_out = N + M S_in with M the product of the
shard's transitions ([K, K]). All four come from ONE run of the unmodified single-device op (any
`impl`) on augmented values and state,

    v' = [v | 0_{T x K}],   S0' = [0_{K x V} | I_K]   ->   o' = [O_loc | Q~],   S' = [N | M],

because the transition acts on the rows of the state only, so its columns evolve independently.
A packed-document reset inside the shard zeroes the whole augmented state, so rows of Q~ after it
are 0 and M = 0, as required. The affine machinery (gather of the maps, cross-shard scan, custom
backward) is `linear_jax.parallel.affine`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax import _compat, ops
from linear_jax.ops.common.heads import default_scale
from linear_jax.parallel.affine import affine_shard
from linear_jax.parallel.decay import DEFAULT_MODE
from linear_jax.parallel.mesh import run_on_mesh


def row_shard(run, x, shape, initial_state, segment_ids, *, axis_name, mode):
    """The affine shard ("matrix", `affine_shard`) of an op whose transition acts on the rows of
    its state [B, H, K, V]: O_loc, Q~, N and M from one run on the augmented values and state
    (module docstring). `run(x, S0, seg, pad) -> (o, S)` runs the single-device op on x from the
    state S0 with `pad` applied to its values (v' = pad(v): [v | 0] in the augmented run, v
    itself in a rerun)."""
    B, H, K, V = shape
    zero_pad = lambda a: jnp.concatenate([a, jnp.zeros(a.shape[:-1] + (K,), a.dtype)], axis=-1)

    def pre(x, seg):
        # [0 | I], typed varying like the inputs (the op's scan carry must be)
        S_aug = _compat.zeros_varying((B, H, K, V + K), *x) + jnp.concatenate(
            [jnp.zeros((K, V), jnp.float32), jnp.eye(K, dtype=jnp.float32)], axis=-1)
        o, S = run(x, S_aug, seg, zero_pad)
        return (o[..., :V], o[..., V:]), S[..., :V], S[..., V:]

    def post(x, seg, parts, S_in):
        o_loc, q_t = parts
        o = o_loc.astype(jnp.float32) + jnp.einsum(
            "bthk,bhkv->bthv", q_t.astype(jnp.float32), S_in, precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32)
        return o.astype(x[2].dtype)

    def rerun(x, seg, S_in):
        return run(x, S_in, seg, lambda a: a)

    return affine_shard(pre, post, "matrix", tuple(x), shape, initial_state, segment_ids,
                        axis_name=axis_name, mode=mode, rerun=rerun)


def matrix_local(op, x, *, axis_name="seq", scale=None, initial_state=None, segment_ids=None,
                 chunk_size=64, impl="auto", config=None, mode=DEFAULT_MODE, **op_kw):
    """`ops.<op>(*x, **op_kw)` on the local shard of a sequence split along `axis_name`, x = (q,
    k, v, ...) with v third; call inside `shard_map`. Returns (o [B,T_loc,H,V], global final
    state)."""
    fn = getattr(ops, op)
    q, v = x[0], x[2]
    K = q.shape[3]
    kw = dict(scale=default_scale(scale, K), chunk_size=chunk_size, impl=impl, config=config,
              **op_kw)

    def run(x, S0, seg, pad):
        return fn(*x[:2], pad(x[2]), *x[3:], initial_state=S0, segment_ids=seg, **kw)

    return row_shard(run, x, (q.shape[0], v.shape[2], K, v.shape[3]), initial_state, segment_ids,
                     axis_name=axis_name, mode=mode)


def matrix_op(op, x, *, mesh, axis_name, batch_axes, head_axes, **kw):
    """`matrix_local` of `ops.<op>(*x)`, under `shard_map` over `mesh` when one is given (the
    public forms' mesh arguments)."""
    if mesh is None:
        return matrix_local(op, x, axis_name=axis_name, **kw)
    init, seg = kw.pop("initial_state"), kw.pop("segment_ids")
    local = lambda *x, **a: matrix_local(op, x, **a, **kw)
    return run_on_mesh(local, mesh, x, initial_state=init, segment_ids=seg, seq_axis=axis_name,
                       batch_axes=batch_axes, head_axes=head_axes,
                       kernel_op=(op, kw["impl"], kw["config"]))


def kda(q, k, v, g, beta, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
        scale=None, initial_state=None, segment_ids=None, chunk_size=64, impl="auto",
        config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.kda` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return matrix_op("kda", (q, k, v, g, beta), mesh=mesh, axis_name=axis_name,
                     batch_axes=batch_axes, head_axes=head_axes, scale=scale,
                     initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                     impl=impl, config=config, mode=mode)


def rwkv7(q, k, v, g, a, b, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
          scale=1.0, initial_state=None, segment_ids=None, chunk_size=64, impl="auto",
          config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.rwkv7` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return matrix_op("rwkv7", (q, k, v, g, a, b), mesh=mesh, axis_name=axis_name,
                     batch_axes=batch_axes, head_axes=head_axes, scale=scale,
                     initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                     impl=impl, config=config, mode=mode)
