"""Log-linear Gated DeltaNet (Guo et al. 2025, "Log-Linear Attention", over Yang et al. 2025,
"Gated Delta Networks").

Gated DeltaNet writes, at each step, the value u_t = beta_t (v_t - k_t^T exp(g_t) S_{t-1}) (what
the key should map to, less what the state already maps it to) and is then the decay recurrence
S_t = exp(g_t) S_{t-1} + k_t u_t^T. The log-linear form keeps Gated DeltaNet's writes, computed
from the whole state S = sum_l S^(l), and reads them through the Fenwick level states of
`linear_jax.ops.log_linear_simple_gla`:

    u_t = beta_t (v_t - k_t^T exp(g_t) sum_l S_{t-1}^(l))
    o_t = scale * sum_l lambda_t^(l) q_t^T S_t^(l)     (levels over the keys k_j and values u_j)

In matrix form O = (Q K^T * M^S * M^H) (I + (K K^T * M^S) strictly lower)^{-1} diag(beta) V: the
hierarchical matrix M^H enters the read, not the inverse. Merging levels keeps their sum, so the
sum of the level states is Gated DeltaNet's state and every lambda = 1 gives Gated DeltaNet.

Shapes as `gated_delta_rule` (q, k [B, T, Hk, K]; v [B, T, H, V]; g, beta [B, T, H]) plus
level_weights [B, T, H, L]; state `FenwickState(levels [B, H, L, K, V], position [B])` float32.

impl: "recurrent" (lax.scan over the level states), "chunk" (the delta rule's chunk form for u,
then the log-linear chunk form over (q, k, u)), "auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common import fenwick
from linear_jax.ops.common.delta_chunk import chunk_delta_values
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.common.recurrent import scan_time
from linear_jax.ops.log_linear_simple_gla import (
    check_fenwick_args,
    fenwick_step,
    log_linear_chunk,
    read_levels,
)


def log_linear_delta_recurrent(q, k, v, g, beta, lam, pos, *, scale, initial_state,
                               segment_ids):
    """The reference: one step per token over the L level states (inputs as the simple-GLA
    form's, plus beta)."""
    B, T, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = (jnp.zeros((B, H, L, K, V), jnp.float32) if initial_state is None
          else f32(initial_state))

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t, lam_t, p_t = x
        S = fenwick_step(S, (p_t, g_t), L)
        pred = jnp.einsum("bhk,bhlkv->bhv", k_t, S, precision="highest")
        u = b_t[..., None] * (v_t - pred)
        S = S.at[:, :, 0].add(k_t[..., :, None] * u[..., None, :])
        return S, read_levels(S, q_t, lam_t)

    xs = (f32(q) * scale, f32(k), f32(v), f32(g), f32(beta), f32(lam), pos)
    return scan_time(step, S0, xs, segment_ids)


def log_linear_delta_chunk(q, k, v, g, beta, lam, pos, *, scale, initial_state, segment_ids,
                           chunk_size):
    S_sum = None if initial_state is None else initial_state.astype(jnp.float32).sum(2)
    u = chunk_delta_values(k, v, beta, g, initial_state=S_sum, segment_ids=segment_ids,
                           chunk_size=chunk_size)
    return log_linear_chunk(q, k, u, g, lam, pos, scale=scale, initial_state=initial_state,
                            segment_ids=segment_ids, chunk_size=chunk_size)


registry.register(registry.OpRecord(
    "log_linear_gated_delta_rule", reference=log_linear_delta_recurrent,
    chunk=log_linear_delta_chunk,
    seq_parallel="linear_jax.parallel.log_linear:log_linear_gated_delta_rule"))


def log_linear_gated_delta_rule(q, k, v, g, beta, level_weights, *, scale=None,
                                initial_state=None, segment_ids=None, chunk_size=64,
                                impl="auto", config=None):
    """Log-linear Gated DeltaNet. Returns `(o [B,T,H,V], FenwickState)`.

    `g [B, T, H]` log decays (<= 0); `beta [B, T, H]` writing strengths; keys are expected
    l2-normalised; `level_weights [B, T, H, L]` as `log_linear_simple_gla`. `config` is accepted
    for the common signature; this op has no kernel.
    """
    op = "log_linear_gated_delta_rule"
    B, T, H, K, V = _checks.check_qkv(op, q, k, v)
    _checks.check_gate(op, "g", g, B, T, H)
    _checks.check_log_decay("g", g)
    _checks.check_gate(op, "beta", beta, B, T, H)
    L, S0, p0 = check_fenwick_args(op, level_weights, initial_state, B, T, H, K, V)
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch(op, impl, T, config, args=(q, k, v))
    q, k = repeat_heads(q, H), repeat_heads(k, H)
    pos = fenwick.positions(p0, segment_ids, B, T)
    o, S = run(q, k, v, g, beta, level_weights, pos, scale=default_scale(scale, K),
               initial_state=S0, segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), fenwick.FenwickState(S, (pos[:, -1] + 1).astype(jnp.float32))
