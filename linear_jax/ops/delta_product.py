"""DeltaProduct: n delta-rule (generalised Householder) steps per token.

    S_t = exp(g_t) S_{t-1};  then for i = 1..n:  S_t <- (I - beta_{t,i} k_{t,i} k_{t,i}^T) S_t
                                                        + beta_{t,i} k_{t,i} v_{t,i}^T
    o_t = scale * S_t^T q_t      (read after the last of the n steps)

so the state transition of a token is a product of n generalised Householder matrices, which
raises the expressivity of the transition with n (Siems et al. 2025, "DeltaProduct: Improving
State-Tracking in Linear RNNs via Householder Products"). As in the paper, the optional gate decays
the state once per token: we apply it before the first of the token's n steps (a reset from
`segment_ids` also happens there). beta in [0, 2] gives each step eigenvalues down to -1.

Shapes: q [B, T, Hk, K]; k [B, T, n, Hk, K]; v [B, T, n, H, V]; beta [B, T, n, H];
g [B, T, H] or None; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.

impl: "recurrent" (lax.scan over tokens, n steps inside each), "chunk" (the n steps interleaved
into a delta rule over T * n steps whose gate sits on each token's first step and whose query is
read only on its last; `chunk_size` counts those interleaved steps; see
`linear_jax.ops.common.delta_chunk`), "auto"; resolved by `linear_jax.ops.registry` (no kernel yet).
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.delta_chunk import chunk_delta
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros


def delta_product_recurrent(q, k, v, beta, g, *, scale, initial_state, segment_ids):
    """The reference: one token per step, its n Householder steps in order. Heads expanded."""
    B, T, n, H, K = k.shape
    V = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = state_or_zeros(initial_state, (B, H, K, V))
    g = jnp.zeros((B, T, H), jnp.float32) if g is None else f32(g)

    def step(S, x):
        q_t, k_t, v_t, b_t, g_t = x
        S = jnp.exp(g_t)[..., None, None] * S
        for i in range(n):
            k_i, v_i, b_i = k_t[:, i], v_t[:, i], b_t[:, i]
            # (I - b k k^T) S + b k v^T  ==  S + b k (v - k^T S)^T
            err = v_i - jnp.einsum("bhk,bhkv->bhv", k_i, S, precision="highest")
            S = S + b_i[..., None, None] * k_i[..., :, None] * err[..., None, :]
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S, precision="highest")

    return scan_time(step, S0, (f32(q) * scale, f32(k), f32(v), f32(beta), g), segment_ids)


def delta_product_chunk(q, k, v, beta, g, *, scale, initial_state, segment_ids, chunk_size):
    B, T, n, H, K = k.shape
    f32 = lambda x: x.astype(jnp.float32)
    flat = lambda x: x.reshape((B, T * n) + x.shape[3:])
    at = lambda x, i: jnp.zeros((B, T, n) + x.shape[2:], jnp.float32).at[:, :, i].set(f32(x))
    q_seq = flat(at(q, n - 1))                          # queries only on each token's last step
    g_seq = None if g is None else flat(at(g, 0))       # the decay before each token's first step
    seg = None if segment_ids is None else jnp.repeat(segment_ids, n, axis=1)
    o, S = chunk_delta(q_seq, flat(k), flat(v), flat(beta), g_seq, scale=scale,
                       initial_state=initial_state, segment_ids=seg, chunk_size=chunk_size)
    return o[:, n - 1::n], S


def _check(q, k, v, beta, g):
    _checks.check_rank("q", q, 4, "[B, T, H, K]")
    _checks.check_rank("k", k, 5, "[B, T, n, H, K]")
    _checks.check_rank("v", v, 5, "[B, T, n, H, V]")
    _checks.check_rank("beta", beta, 4, "[B, T, n, H]")
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _checks.check_float(name, x)
    op = "delta_product"
    named = [("q", q), ("k", k), ("v", v), ("beta", beta)]
    B = _checks.check_dims(op, [(n_, x, 0) for n_, x in named], "the batch size B (axis 0)")
    T = _checks.check_dims(op, [(n_, x, 1) for n_, x in named], "the sequence length T (axis 1)")
    n = _checks.check_dims(op, [(n_, x, 2) for n_, x in named[1:]],
                           "the steps per token n (axis 2)")
    Hk = _checks.check_dims(op, [("q", q, 2), ("k", k, 3)], "the key heads Hk")
    H = _checks.check_dims(op, [("v", v, 3), ("beta", beta, 3)], "the value heads H")
    K = _checks.check_dims(op, [("q", q, 3), ("k", k, 4)], "the key dim K")
    if H % Hk:
        raise ValueError(f"{op}: the heads of v (H={H}) must be a multiple of the heads of q and k "
                         f"(Hk={Hk}), got q{_checks.shape_str(q)} and v{_checks.shape_str(v)}")
    if g is not None:
        _checks.check_gate(op, "g", g, B, T, H)
        _checks.check_log_decay("g", g)
    return B, T, n, H, K, v.shape[-1]


registry.register(registry.OpRecord("delta_product", reference=delta_product_recurrent,
                                    chunk=delta_product_chunk))


def delta_product(q, k, v, beta, g=None, *, scale=None, initial_state=None, segment_ids=None,
                  chunk_size=64, impl="auto", config=None):
    """DeltaProduct with n = k.shape[2] steps per token. Returns
    `(o [B,T,H,V], final_state [B,H,K,V] float32)`. `g [B, T, H]` (optional) decays once per
    token, before its first step.

    `config` (a kernel config or a tuple of them) is taken for the uniform call of every op;
    this op has no kernel, so it is ignored.
    """
    B, T, n, H, K, V = _check(q, k, v, beta, g)
    _checks.check_state("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("delta_product", impl, T, config)
    q, k = repeat_heads(q, H), repeat_heads(k, H, axis=3)
    o, S = run(q, k, v, beta, g, scale=default_scale(scale, K), initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), S
