"""Sequence-parallel delta rule: `delta_rule` and `gated_delta_rule`.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = scale * S_t^T q_t

A shard run from S_in gives O = O_loc + Q~ S_in and S_out = N + M S_in with M = A_last the product
of the shard's transitions ([K, K]) and Q~_t = scale * q_t^T A_t. All four come from ONE run of the
unmodified single-device op (any `impl`) on augmented values and state:

    v' = [v | 0_{T x K}],   S0' = [0_{K x V} | I_K]   ->   o' = [O_loc | Q~],   S' = [N | M]

because the transition acts on the rows of the state only, so its columns evolve independently
(design note §2). A packed-document reset inside the shard zeroes the whole augmented state, so
rows of Q~ after it are 0 and M = 0, as required. Q~ comes out in v's dtype (the op casts its
output); M, the cross-shard scan and S_in are float32. ZeCO's elementwise fix does not apply here:
fixing the delta rule's chunk states costs K^2 V per chunk, more than the correction GEMM.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax import _compat, ops
from linear_jax.ops.common.heads import default_scale
from linear_jax.parallel.affine import affine_shard
from linear_jax.parallel.decay import DEFAULT_MODE
from linear_jax.parallel.mesh import run_on_mesh


def _op(q, k, v, g, beta, **kw):
    if g is None:
        return ops.delta_rule(q, k, v, beta, **kw)
    return ops.gated_delta_rule(q, k, v, g, beta, **kw)


def delta_local(q, k, v, g, beta, *, axis_name="seq", exact=False, scale=None, initial_state=None,
                segment_ids=None, chunk_size=64, impl="auto", config=None, mode=DEFAULT_MODE):
    """The delta rule (g None) or Gated DeltaNet on the local shard of a sequence split along
    `axis_name`; call inside `shard_map`. Returns (o [B,T_loc,H,V], global final state)."""
    B, T, Hk, K = q.shape
    H, V = v.shape[2], v.shape[3]
    kw = dict(exact=exact, scale=default_scale(scale, K), chunk_size=chunk_size, impl=impl,
              config=config)

    def pre(x, seg):
        q, k, v, g, beta = x
        v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (K,), v.dtype)], axis=-1)
        # [0 | I], typed varying like the inputs (the op's scan carry must be)
        S_aug = _compat.zeros_varying((B, H, K, V + K), q, k, v, g, beta) + jnp.concatenate(
            [jnp.zeros((K, V), jnp.float32), jnp.eye(K, dtype=jnp.float32)], axis=-1)
        o, S = _op(q, k, v_aug, g, beta, initial_state=S_aug, segment_ids=seg, **kw)
        return (o[..., :V], o[..., V:]), S[..., :V], S[..., V:]

    def post(x, seg, parts, S_in):
        o_loc, q_t = parts
        o = o_loc.astype(jnp.float32) + jnp.einsum(
            "bthk,bhkv->bthv", q_t.astype(jnp.float32), S_in, precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32)
        return o.astype(x[2].dtype)

    def rerun(x, seg, S_in):
        return _op(*x, initial_state=S_in, segment_ids=seg, **kw)

    return affine_shard(pre, post, "matrix", (q, k, v, g, beta), (B, H, K, V), initial_state,
                        segment_ids, axis_name=axis_name, mode=mode, rerun=rerun)


def _public(q, k, v, g, beta, *, mesh, axis_name, batch_axes, head_axes, **kw):
    if mesh is None:
        return delta_local(q, k, v, g, beta, axis_name=axis_name, **kw)
    init, seg = kw.pop("initial_state"), kw.pop("segment_ids")
    local = lambda q, k, v, g, beta, **a: delta_local(q, k, v, g, beta, **a, **kw)
    op = "delta_rule" if g is None else "gated_delta_rule"
    return run_on_mesh(local, mesh, (q, k, v, g, beta), initial_state=init, segment_ids=seg,
                       seq_axis=axis_name, batch_axes=batch_axes, head_axes=head_axes,
                       kernel_op=(op, kw["impl"], kw["config"]))


def delta_rule(q, k, v, beta, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
               exact=False, scale=None, initial_state=None, segment_ids=None, chunk_size=64,
               impl="auto", config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.delta_rule` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return _public(q, k, v, None, beta, mesh=mesh, axis_name=axis_name, batch_axes=batch_axes,
                   head_axes=head_axes, exact=exact, scale=scale, initial_state=initial_state,
                   segment_ids=segment_ids, chunk_size=chunk_size, impl=impl, config=config,
                   mode=mode)


def gated_delta_rule(q, k, v, g, beta, *, axis_name="seq", mesh=None, batch_axes=None,
                     head_axes=None, exact=False, scale=None, initial_state=None,
                     segment_ids=None, chunk_size=64, impl="auto", config=None,
                     mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.gated_delta_rule` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return _public(q, k, v, g, beta, mesh=mesh, axis_name=axis_name, batch_axes=batch_axes,
                   head_axes=head_axes, exact=exact, scale=scale, initial_state=initial_state,
                   segment_ids=segment_ids, chunk_size=chunk_size, impl=impl, config=config,
                   mode=mode)
