"""Log-linear attention over Mamba-2's scalar decay (Guo et al. 2025, "Log-Linear Attention").

A linear-attention state compresses the whole prefix into one [K, V] matrix. Log-linear attention
keeps O(log T) of them: the prefix of query t is cut into Fenwick-tree buckets (the token itself,
then buckets of 1, 2, 4, ... older tokens), each summarised by its own state, and the query reads
each level l through its own data-dependent weight lambda_t^(l) >= 0:

    o_t = scale * sum_l lambda_t^(l) q_t^T S_t^(l)
    S_t^(l) = sum_{j in bucket l of t} exp(g_{j+1} + ... + g_t) k_j v_j^T

Key j sits, seen from query t, at level bit_length(p_t XOR p_j) (0 for j = t), p the position of
the token in its document; with L levels, every level from L-1 up is pooled into level L-1 (it then
holds the unbounded remainder, like a plain linear-attention state; L >= ceil(log2 T) + 1 levels
give the paper's exact partition). As a recurrence: at position p, levels 0 .. m merge into level
m = min(ctz(p) + 1, L-1) (m = L-1 at p = 0), then every level decays by exp(g_t) and level 0
takes k_t v_t^T. A level's content thus only moves up, to max(level, m), which is what makes the
chunk form's bookkeeping closed-form (`linear_jax.ops.common.fenwick`). With L = 1 this is
simple GLA with the output scaled by lambda^(0). In matrix form O = (Q K^T * M^S * M^H) V with
M^S Mamba-2's decay mask and M^H the hierarchical matrix M^H_ij = lambda_i^(level(i, j)).

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V]; g [B, T, H] (g <= 0) or None; level_weights
[B, T, H, L]; state `FenwickState(levels [B, H, L, K, V], position [B])` float32 (the position lets
a later call continue the partition; `initial_state` may be that pair or a plain tuple of it);
o [B, T, H, V] in v's dtype. Packed documents restart positions: a packed document computes exactly
what it computes alone.

impl: "recurrent" (lax.scan over the level states), "chunk" (chunk-parallel, O(T C + T L K V / C)),
"auto"; resolved by `linear_jax.ops.registry`.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common import fenwick
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.common.recurrent import scan_time


def fenwick_step(S, x, L):
    """One token on the level states S [B,H,L,K,V]: merge, decay; x = (pos [B], g [B,H])."""
    pos, g_t = x
    S = fenwick.merge(S, fenwick.step_targets(pos, L))
    return jnp.exp(g_t)[..., None, None, None] * S


def read_levels(S, q_t, lam_t):
    """sum_l lambda^(l) q^T S^(l): q_t [B,H,K], lam_t [B,H,L] -> [B,H,V]."""
    return jnp.einsum("bhl,bhk,bhlkv->bhv", lam_t, q_t, S, precision="highest")


def log_linear_recurrent(q, k, v, g, lam, pos, *, scale, initial_state, segment_ids):
    """The reference: one step per token over the L level states. Inputs validated, heads
    expanded, positions given (`fenwick.positions`), initial_state the levels or None."""
    B, T, H, K = q.shape
    V, L = v.shape[-1], lam.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = (jnp.zeros((B, H, L, K, V), jnp.float32) if initial_state is None
          else f32(initial_state))
    g = jnp.zeros((B, T, H), jnp.float32) if g is None else f32(g)

    def step(S, x):
        q_t, k_t, v_t, g_t, lam_t, p_t = x
        S = fenwick_step(S, (p_t, g_t), L)
        S = S.at[:, :, 0].add(k_t[..., :, None] * v_t[..., None, :])
        return S, read_levels(S, q_t, lam_t)

    xs = (f32(q) * scale, f32(k), f32(v), g, f32(lam), pos)
    return scan_time(step, S0, xs, segment_ids)


def log_linear_chunk(q, k, v, g, lam, pos, *, scale, initial_state, segment_ids, chunk_size):
    B, _, H, K = q.shape
    S0 = initial_state
    if S0 is None:
        S0 = jnp.zeros((B, H, lam.shape[-1], K, v.shape[-1]), jnp.float32)
    return fenwick.chunk_fenwick(q, k, v, g, lam, pos, S0.astype(jnp.float32), scale=scale,
                                 segment_ids=segment_ids, chunk_size=chunk_size)


registry.register(registry.OpRecord(
    "log_linear_simple_gla", reference=log_linear_recurrent, chunk=log_linear_chunk,
    seq_parallel="linear_jax.parallel.log_linear:log_linear_simple_gla"))


def check_fenwick_args(op, level_weights, initial_state, B, T, H, K, V):
    """Checks the level weights and the state; returns (L, levels or None, position [B] int32)."""
    _checks.check_rank("level_weights", level_weights, 4, "[B, T, H, L]")
    _checks.check_float("level_weights", level_weights)
    L = level_weights.shape[-1]
    _checks.check_shape("level_weights", level_weights, (B, T, H, L), "[B, T, H, L]")
    if initial_state is None:
        return L, None, jnp.zeros((B,), jnp.int32)
    if not isinstance(initial_state, tuple) or len(initial_state) != 2:
        raise ValueError(f"{op}: initial_state must be a FenwickState (levels [B, H, L, K, V], "
                         f"position [B]) or None, got {type(initial_state).__name__}")
    levels, position = initial_state
    _checks.check_state("initial_state.levels", levels, (B, H, L, K, V), "[B, H, L, K, V]")
    _checks.check_shape("initial_state.position", position, (B,), "[B]")
    return L, levels, jnp.round(jnp.asarray(position)).astype(jnp.int32)


def log_linear_simple_gla(q, k, v, g, level_weights, *, scale=None, initial_state=None,
                          segment_ids=None, chunk_size=64, impl="auto", config=None):
    """Log-linear Mamba-2 / simple GLA. Returns `(o [B,T,H,V], FenwickState)`.

    `level_weights [B, T, H, L]`: lambda_t^(l), the weight of level l for query t (typically a
    softplus of a projection); L fixes the number of level states. `g` may be None (no decay).
    `config` is accepted for the common signature; this op has no kernel.
    """
    B, T, H, K, V = _checks.check_qkv("log_linear_simple_gla", q, k, v)
    if g is not None:
        _checks.check_gate("log_linear_simple_gla", "g", g, B, T, H)
        _checks.check_log_decay("g", g)
    L, S0, p0 = check_fenwick_args("log_linear_simple_gla", level_weights, initial_state,
                                   B, T, H, K, V)
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("log_linear_simple_gla", impl, T, config, args=(q, k, v))
    q, k = repeat_heads(q, H), repeat_heads(k, H)
    pos = fenwick.positions(p0, segment_ids, B, T)
    o, S = run(q, k, v, g, level_weights, pos, scale=default_scale(scale, K),
               initial_state=S0, segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), fenwick.FenwickState(S, (pos[:, -1] + 1).astype(jnp.float32))
