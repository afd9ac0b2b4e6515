"""Specs for log-linear attention: log_linear_simple_gla and log_linear_gated_delta_rule.

The float64 reference is the Fenwick recurrence written out with Python integers: at position p
the levels 0 .. m merge into level m = min(ctz(p) + 1, L - 1) (L - 1 at p = 0), every level decays,
level 0 takes the new key. `matrix_reference` is the paper's matrix form (the hierarchical mask
lambda_i^(level(i, j)) with level(i, j) = bit_length(p_i XOR p_j)) for a state-free call;
tests/ops/test_log_linear.py checks the two agree. The state is `(levels, position)`: positions are
drawn as small integers, including 0 (a fresh document: the held levels all sit at the top).

Strong gates: g is the log decay, drawn strong; beta, lambda and the keys stay as drawn.
"""

from __future__ import annotations

import numpy as np

from linear_jax import ops
from tests.ops.specs import OpSpec, cast_like, resets, strong_log_decays
from tests.utils import l2norm, log_sigmoid_gates

H, K, V, L = 2, 12, 10, 4     # 4 levels: T = 37 pools keys 4 or more positions back at the top


def target(p, L_):
    if p == 0:
        return L_ - 1
    ctz = (p & -p).bit_length() - 1
    return min(ctz + 1, L_ - 1)


def fenwick_reference(q, k, v, g, beta, lam, S0, seg, scale):
    """float64 loop over the level states; beta None: simple GLA, else Gated DeltaNet's writes."""
    q, k, v, lam = (np.asarray(x, np.float64) for x in (q, k, v, lam))
    B, T, H_, K_ = q.shape
    L_ = lam.shape[-1]
    S = np.zeros((B, H_, L_, K_, v.shape[-1]))
    p = np.zeros(B, np.int64)
    if S0 is not None:
        S, p = S0[0].copy(), np.round(S0[1]).astype(np.int64)
    r = np.zeros((B, T), bool) if seg is None else resets(seg)
    o = np.zeros(v.shape)
    for t in range(T):
        for b in range(B):
            if r[b, t]:
                S[b], p[b] = 0.0, 0
            m = target(int(p[b]), L_)
            S[b, :, m] = S[b, :, : m + 1].sum(1)
            S[b, :, :m] = 0.0
            if g is not None:
                S[b] *= np.exp(g[b, t])[:, None, None, None]
            u = v[b, t]
            if beta is not None:
                u = beta[b, t][:, None] * (v[b, t] - np.einsum("hk,hlkv->hv", k[b, t], S[b]))
            S[b, :, 0] += k[b, t][:, :, None] * u[:, None, :]
            o[b, t] = scale * np.einsum("hl,hk,hlkv->hv", lam[b, t], q[b, t], S[b])
            p[b] += 1
    return o, (S, p.astype(np.float64))


def matrix_reference(q, k, v, g, lam, scale):
    """float64 O = (Q K^T * M^S * M^H) V for one document from position 0, no initial state."""
    B, T, H_, _ = q.shape
    L_ = lam.shape[-1]
    G = np.cumsum(g, axis=1)                                      # [B, T, H]
    o = np.zeros(v.shape)
    for i in range(T):
        for j in range(i + 1):
            lev = min((i ^ j).bit_length(), L_ - 1)
            w = lam[:, i, :, lev] * np.exp(G[:, i] - G[:, j])      # [B, H]
            o[:, i] += (scale * w * np.einsum("bhk,bhk->bh", q[:, i], k[:, j]))[..., None] * v[:, j]
    return o


def _make(rng, B, T, dtype, delta=False):
    f = lambda *s: rng.standard_normal(s).astype(dtype)
    k = l2norm(rng.standard_normal((B, T, H, K))).astype(dtype) if delta else f(B, T, H, K)
    args = {"q": f(B, T, H, K), "k": k, "v": f(B, T, H, V),
            "g": log_sigmoid_gates(rng, (B, T, H), lo=-2.0, hi=4.0).astype(dtype)}
    if delta:
        args["beta"] = rng.uniform(0.1, 1.0, (B, T, H)).astype(dtype)
    args["level_weights"] = rng.uniform(0.2, 1.5, (B, T, H, L)).astype(dtype)
    return args, {}


def _draw_state(rng, args):
    B = args["q"].shape[0]
    levels = rng.standard_normal((B, H, L, K, V)).astype(np.float32)
    return levels, np.array([5, 0, 12, 3][:B], np.float32)      # 0: a fresh document


def _strong(args, rng, kind):
    return cast_like(args, {"g": strong_log_decays(rng, args["g"].shape, kind)})


def _ref(a, S0, seg):
    return fenwick_reference(a["q"], a["k"], a["v"], a["g"], a.get("beta"),
                             a["level_weights"], S0, seg, K**-0.5)


_state = lambda a: ((a["q"].shape[0], H, L, K, V), (a["q"].shape[0],))

SPECS = [
    OpSpec("log_linear_simple_gla", ops.log_linear_simple_gla, _make, _ref, _state,
           diff_args=("q", "k", "v", "g", "level_weights"), strong=_strong,
           draw_state=_draw_state),
    OpSpec("log_linear_gated_delta_rule", ops.log_linear_gated_delta_rule,
           lambda rng, B, T, dtype: _make(rng, B, T, dtype, delta=True), _ref, _state,
           diff_args=("q", "k", "v", "g", "beta", "level_weights"), strong=_strong,
           draw_state=_draw_state),
]
