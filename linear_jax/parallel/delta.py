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
fixing the delta rule's chunk states costs K^2 V per chunk, more than the correction GEMM. The
forms are `linear_jax.parallel.rank_one`'s (`matrix_op`), as for kda and rwkv7.
"""

from __future__ import annotations

from linear_jax.parallel.decay import DEFAULT_MODE
from linear_jax.parallel.rank_one import matrix_op


def delta_rule(q, k, v, beta, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
               exact=False, scale=None, initial_state=None, segment_ids=None, chunk_size=64,
               impl="auto", config=None, mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.delta_rule` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return matrix_op("delta_rule", (q, k, v, beta), mesh=mesh, axis_name=axis_name,
                     batch_axes=batch_axes, head_axes=head_axes, exact=exact, scale=scale,
                     initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                     impl=impl, config=config, mode=mode)


def gated_delta_rule(q, k, v, g, beta, *, axis_name="seq", mesh=None, batch_axes=None,
                     head_axes=None, exact=False, scale=None, initial_state=None,
                     segment_ids=None, chunk_size=64, impl="auto", config=None,
                     mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.gated_delta_rule` (mesh arguments as
    `linear_jax.parallel.simple_gla`)."""
    return matrix_op("gated_delta_rule", (q, k, v, g, beta), mesh=mesh, axis_name=axis_name,
                     batch_axes=batch_axes, head_axes=head_axes, exact=exact, scale=scale,
                     initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                     impl=impl, config=config, mode=mode)
