"""Specs for the peer-library mixers: kda (per-channel gated delta rule), rwkv7 (diagonal plus
rank-one transition), mamba3 (trapezoidal rule, rotary state) and mamba3_mimo (its rank-r form).

Strong gates: the g [B, T, H, K] of kda and rwkv7 is the per-channel log decay of each step, so
every g is drawn strong; beta, a, b and the keys stay as drawn. mamba3's (and mamba3_mimo's)
g [B, T, H] (A dt) is its log decay, drawn strong; dt, trap and the angles stay as drawn.
"""

from __future__ import annotations

import numpy as np

from linear_jax import ops
from tests.ops.specs import OpSpec, cast_like, resets, strong_log_decays
from tests.utils import l2norm, log_sigmoid_gates

H, K, V = 2, 12, 10


def _f64(*xs):
    # explicit: bf16 arrays (ml_dtypes) are not np.floating and would otherwise compute in bf16
    return [None if x is None else np.asarray(x, np.float64) for x in xs]


def kda_reference(q, k, v, g, beta, S0, seg, scale):
    """float64 loop: S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T, with
    the Householder-like matrix formed explicitly."""
    q, k, v, g, beta, S0 = _f64(q, k, v, g, beta, S0)
    B, T, H_, V_ = v.shape
    q, k = np.repeat(q, H_ // q.shape[2], 2), np.repeat(k, H_ // k.shape[2], 2)
    K_ = q.shape[-1]
    S = np.zeros((B, H_, K_, V_)) if S0 is None else S0.copy()
    r = np.zeros((B, T), bool) if seg is None else resets(seg)
    o = np.zeros((B, T, H_, V_))
    for t in range(T):
        S[r[:, t]] = 0.0
        kt, bt = k[:, t], beta[:, t]
        P = np.eye(K_) - bt[..., None, None] * kt[..., :, None] * kt[..., None, :]
        S = np.einsum("bhij,bhjv->bhiv", P, np.exp(g[:, t])[..., None] * S)
        S = S + bt[..., None, None] * kt[..., :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def rwkv7_reference(q, k, v, g, a, b, S0, seg, scale):
    """float64 loop in RWKV's own layout, wkv [V, K] acting on row vectors:
    wkv_t = wkv_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t, o_t = wkv_t (scale r_t); the state
    returned is wkv^T, the library's [K, V]."""
    q, k, v, g, a, b, S0 = _f64(q, k, v, g, a, b, S0)
    B, T, H_, V_ = v.shape
    K_ = q.shape[-1]
    wkv = np.zeros((B, H_, V_, K_)) if S0 is None else np.swapaxes(S0, -1, -2).copy()
    r = np.zeros((B, T), bool) if seg is None else resets(seg)
    o = np.zeros((B, T, H_, V_))
    for t in range(T):
        wkv[r[:, t]] = 0.0
        M = (np.exp(g[:, t])[..., :, None] * np.eye(K_)
             + a[:, t, :, :, None] * b[:, t, :, None, :])
        wkv = np.einsum("bhvk,bhkj->bhvj", wkv, M) + v[:, t, :, :, None] * k[:, t, :, None, :]
        o[:, t] = np.einsum("bhvk,bhk->bhv", wkv, scale * q[:, t])
    return o, np.swapaxes(wkv, -1, -2)


def mamba3_reference(q, k, v, g, dt, trap, theta, S0, seg, scale):
    """SISO: the MIMO loop below at rank 1."""
    S0 = None if S0 is None else (S0[0], S0[1][:, :, None], S0[2][:, :, None])
    o, (S, kl, vl) = mamba3_mimo_reference(q[:, :, :, None], k[:, :, :, None], v[:, :, :, None],
                                           g, dt, trap, theta, S0, seg, scale)
    return o[:, :, :, 0], (S, kl[:, :, 0], vl[:, :, 0])


def mamba3_mimo_reference(q, k, v, g, dt, trap, theta, S0, seg, scale):
    """float64 loop with the complex state written as an explicit block-diagonal rotation:
    S_t = exp(g_t) R_t^T (S_{t-1} + (1 - lam_t) dt_t K_{t-1}^T V_{t-1}) + lam_t dt_t K_t^T V_t,
    O_t = Q_t S_t, with K, Q [r, N], V [r, P]; R_t rotates the pairs (2i, 2i+1), i < R, by
    +theta_t[i]; the state is (S, K_last, V_last)."""
    q, k, v, g, dt, trap, theta = _f64(q, k, v, g, dt, trap, theta)
    B, T, H_, r, P_ = v.shape
    q, k = np.repeat(q, H_ // q.shape[2], 2), np.repeat(k, H_ // k.shape[2], 2)
    N_ = q.shape[-1]
    if S0 is None:
        S, kl, vl = np.zeros((B, H_, N_, P_)), np.zeros((B, H_, r, N_)), np.zeros((B, H_, r, P_))
    else:
        S, kl, vl = (np.asarray(x, np.float64).copy() for x in S0)
    rs = np.zeros((B, T), bool) if seg is None else resets(seg)
    o = np.zeros((B, T, H_, r, P_))
    for t in range(T):
        S[rs[:, t]], kl[rs[:, t]], vl[rs[:, t]] = 0.0, 0.0, 0.0
        Rm = np.broadcast_to(np.eye(N_), (B, H_, N_, N_)).copy()
        for i in range(theta.shape[-1]):
            c, s = np.cos(theta[:, t, :, i]), np.sin(theta[:, t, :, i])
            Rm[..., 2 * i, 2 * i], Rm[..., 2 * i, 2 * i + 1] = c, -s
            Rm[..., 2 * i + 1, 2 * i], Rm[..., 2 * i + 1, 2 * i + 1] = s, c
        lam, d = trap[:, t], dt[:, t]
        inner = S + ((1 - lam) * d)[..., None, None] * np.einsum("bhrn,bhrp->bhnp", kl, vl)
        S = np.exp(g[:, t])[..., None, None] * np.einsum("bhji,bhjp->bhip", Rm, inner)
        S = S + (lam * d)[..., None, None] * np.einsum("bhrn,bhrp->bhnp", k[:, t], v[:, t])
        kl, vl = k[:, t].copy(), v[:, t].copy()
        o[:, t] = scale * np.einsum("bhrn,bhnp->bhrp", q[:, t], S)
    return o, (S, kl, vl)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _make_kda(rng, B, T, dtype, Hk=1):
    args = {"q": rng.standard_normal((B, T, Hk, K)),
            "k": l2norm(rng.standard_normal((B, T, Hk, K))),
            "v": rng.standard_normal((B, T, H, V)),
            "g": log_sigmoid_gates(rng, (B, T, H, K)),
            "beta": 2.0 * _sigmoid(rng.standard_normal((B, T, H)))}
    return {n: np.asarray(x).astype(dtype) for n, x in args.items()}, {}


def _make_rwkv7(rng, B, T, dtype):
    """RWKV-7's parametrisation: w = exp(-exp(-0.5) sigmoid(.)), removal key a = -kappa_hat,
    replacement b = kappa_hat * a_lr, a_lr in (0, 1)."""
    kappa = l2norm(rng.standard_normal((B, T, H, K)))
    lr = _sigmoid(rng.standard_normal((B, T, H, K)))
    args = {"q": rng.standard_normal((B, T, H, K)),
            "k": 0.5 * rng.standard_normal((B, T, H, K)),
            "v": rng.standard_normal((B, T, H, V)),
            "g": -np.exp(-0.5) * _sigmoid(rng.standard_normal((B, T, H, K))),
            "a": -kappa, "b": kappa * lr}
    return {n: np.asarray(x).astype(dtype) for n, x in args.items()}, {}


def _make_mamba3(rng, B, T, dtype, Hk=1, R=4):
    """Mamba-3's parametrisation: dt = softplus(.), g = A dt with A = -softplus(.), trap =
    sigmoid(.), angles tanh(.) pi dt on R of the N / 2 pairs."""
    softplus = lambda x: np.logaddexp(0, x)
    dt = softplus(rng.standard_normal((B, T, H)) - 1.0)
    args = {"q": rng.standard_normal((B, T, Hk, K)), "k": rng.standard_normal((B, T, Hk, K)),
            "v": rng.standard_normal((B, T, H, V)),
            "g": -softplus(rng.standard_normal((B, T, H))) * dt, "dt": dt,
            "trap": _sigmoid(rng.standard_normal((B, T, H))),
            "theta": np.tanh(rng.standard_normal((B, T, H, R))) * np.pi * dt[..., None]}
    return {n: np.asarray(x).astype(dtype) for n, x in args.items()}, {}


def _make_mamba3_mimo(rng, B, T, dtype, r=2):
    """As `_make_mamba3`, with r keys, queries and values per step."""
    args, kw = _make_mamba3(rng, B, T, dtype)
    rank = lambda *s: rng.standard_normal(s).astype(dtype)
    return {**args, "q": rank(B, T, 1, r, K), "k": rank(B, T, 1, r, K),
            "v": rank(B, T, H, r, V)}, kw


def _strong_g(args, rng, kind):
    return cast_like(args, {"g": strong_log_decays(rng, args["g"].shape, kind)})


_state = lambda a: (a["q"].shape[0], a["v"].shape[2], K, V)

SPECS = [
    OpSpec("kda", ops.kda, _make_kda,
           lambda a, S0, seg: kda_reference(a["q"], a["k"], a["v"], a["g"], a["beta"], S0, seg,
                                            K**-0.5),
           _state, diff_args=("q", "k", "v", "g", "beta"), strong=_strong_g),
    OpSpec("rwkv7", ops.rwkv7, _make_rwkv7,
           lambda a, S0, seg: rwkv7_reference(a["q"], a["k"], a["v"], a["g"], a["a"], a["b"], S0,
                                              seg, 1.0),
           _state, diff_args=("q", "k", "v", "g", "a", "b"), strong=_strong_g),
    OpSpec("mamba3", ops.mamba3, _make_mamba3,
           lambda a, S0, seg: mamba3_reference(a["q"], a["k"], a["v"], a["g"], a["dt"], a["trap"],
                                               a["theta"], S0, seg, 1.0),
           lambda a: (_state(a), _state(a)[:3], _state(a)[:2] + (V,)),
           diff_args=("q", "k", "v", "g", "dt", "trap", "theta"), strong=_strong_g),
    OpSpec("mamba3_mimo", ops.mamba3_mimo, _make_mamba3_mimo,
           lambda a, S0, seg: mamba3_mimo_reference(a["q"], a["k"], a["v"], a["g"], a["dt"],
                                                    a["trap"], a["theta"], S0, seg, 1.0),
           lambda a: (_state(a), _state(a)[:2] + a["k"].shape[3:],
                      _state(a)[:2] + a["v"].shape[3:]),
           diff_args=("q", "k", "v", "g", "dt", "trap", "theta"), strong=_strong_g),
]
