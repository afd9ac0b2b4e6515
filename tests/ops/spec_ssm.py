"""Specs for the state-space family: ssd (Mamba-2) and mlstm (xLSTM).

Strong gates, per op:
- ssd: the log decay of head h at step t is dt A[h] (dt after bias and softplus): every such
  product is drawn strong and dt set to it over A (as drawn), the raw dt solved for through
  the softplus and dt_bias where the spec has them.
- mlstm: the forget gate's log-space decay is log sigmoid(f): every one is drawn strong, f =
  -log(exp(-g) - 1) (about g itself); the input gates stay as drawn, so the stabiliser m still
  switches between the carried and the new term.
"""

from __future__ import annotations

import numpy as np

from linear_jax.ops.mlstm import mlstm
from linear_jax.ops.ssd import ssd
from tests.ops.specs import OpSpec, cast_like, narrow_kernels, resets, strong_log_decays

H, G, P, N = 4, 2, 6, 8           # ssd: heads, groups of B/C, head dim, state dim
HM, K, V = 2, 12, 10              # mlstm


def _f64(*xs):
    # explicit: bf16 arrays (ml_dtypes) are not np.floating and would otherwise compute in bf16
    return [None if x is None else np.asarray(x, np.float64) for x in xs]


def _softplus(x):
    return np.logaddexp(0.0, x)


def ssd_reference(x, dt, A, Bm, Cm, D, dt_bias, dt_softplus, h0, seg):
    """float64 loop: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = h_t^T C_t + D x_t."""
    x, dt, A, Bm, Cm, D, dt_bias, h0 = _f64(x, dt, A, Bm, Cm, D, dt_bias, h0)
    Bs, T, H_, P_ = x.shape
    rep = H_ // Bm.shape[2]
    Bm, Cm = np.repeat(Bm, rep, axis=2), np.repeat(Cm, rep, axis=2)   # head h reads group h // rep
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = _softplus(dt)
    h = np.zeros((Bs, H_, Bm.shape[-1], P_)) if h0 is None else h0.copy()
    r = np.zeros((Bs, T), bool) if seg is None else resets(seg)
    y = np.zeros_like(x)
    for t in range(T):
        h[r[:, t]] = 0.0
        h = (np.exp(dt[:, t] * A)[..., None, None] * h
             + dt[:, t, :, None, None] * Bm[:, t, :, :, None] * x[:, t, :, None, :])
        y[:, t] = np.einsum("bhn,bhnp->bhp", Cm[:, t], h)
        if D is not None:
            y[:, t] += D[:, None] * x[:, t]
    return y, h


def mlstm_reference(q, k, v, i, f, state0, seg, scale, eps=1e-6):
    """float64 loop on the unstabilised memory C~ = exp(m) C, n~ = exp(m) n (xLSTM eq. 19-27):

        C~_t = sigmoid(f_t) C~_{t-1} + exp(i_t) k_t v_t^T,  n~_t likewise with k_t,
        h_t = C~_t^T q_t / (max(|n~_t . q_t|, 1) + eps exp(m_t)),  m_t = max(log f_t + m_{t-1}, i_t)

    which is the stabilised step of `mlstm_kernels` rescaled by exp(m_t); returns (C, n, m)
    stabilised again. Resets restart from (0, 0, 0).
    """
    q, k, v, i, f = _f64(q, k, v, i, f)
    Bs, T, H_, V_ = v.shape
    rep = H_ // q.shape[2]
    q, k = np.repeat(q, rep, axis=2) * scale, np.repeat(k, rep, axis=2)
    K_ = q.shape[-1]
    if state0 is None:
        C, n, m = np.zeros((Bs, H_, K_, V_)), np.zeros((Bs, H_, K_)), np.zeros((Bs, H_))
    else:
        C, n, m = (np.asarray(s, np.float64).copy() for s in state0)
    C, n = C * np.exp(m)[..., None, None], n * np.exp(m)[..., None]
    logf = -np.logaddexp(0.0, -f)
    r = np.zeros((Bs, T), bool) if seg is None else resets(seg)
    h = np.zeros((Bs, T, H_, V_))
    for t in range(T):
        C[r[:, t]], n[r[:, t]], m[r[:, t]] = 0.0, 0.0, 0.0
        m = np.maximum(logf[:, t] + m, i[:, t])
        w = np.exp(i[:, t])
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        C = np.exp(logf[:, t])[..., None, None] * C + w[..., None, None] * kv
        n = np.exp(logf[:, t])[..., None] * n + w[..., None] * k[:, t]
        den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", q[:, t], n)), 1.0) + eps * np.exp(m)
        h[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], C) / den[..., None]
    return h, (C * np.exp(-m)[..., None, None], n * np.exp(-m)[..., None], m)


def _make_ssd(rng, B, T, dtype):
    f = lambda *s: rng.standard_normal(s).astype(dtype)
    args = {"x": f(B, T, H, P), "dt": f(B, T, H),
            "A": -np.exp(rng.uniform(-1.5, 0.5, H)).astype(dtype),
            "B": f(B, T, G, N), "C": f(B, T, G, N), "D": f(H), "dt_bias": f(H)}
    return args, {}


def _make_ssd_plain(rng, B, T, dtype):
    """G = H, dt given directly (no softplus, no bias), no skip."""
    f = lambda *s: rng.standard_normal(s).astype(dtype)
    args = {"x": f(B, T, H, P), "dt": rng.uniform(0.0, 1.0, (B, T, H)).astype(dtype),
            "A": -np.exp(rng.uniform(-1.5, 0.5, H)).astype(dtype), "B": f(B, T, H, N),
            "C": f(B, T, H, N)}
    return args, {"dt_softplus": False}


def _make_mlstm(rng, B, T, dtype):
    f = lambda *s: rng.standard_normal(s).astype(dtype)
    # input gates over a range where the max-state switches between the carried and the new term
    args = {"q": f(B, T, HM, K), "k": f(B, T, HM, K), "v": f(B, T, HM, V),
            "i": rng.uniform(-4.0, 6.0, (B, T, HM)).astype(dtype),
            "f": rng.uniform(-2.0, 5.0, (B, T, HM)).astype(dtype)}
    return args, {}


def _strong_ssd(args, rng, kind):
    g = strong_log_decays(rng, args["dt"].shape, kind)
    dt = g / np.asarray(args["A"], np.float64)
    if "dt_bias" in args:        # softplus(raw + bias) = dt; softplus^-1(y) = y + log(1 - e^-y)
        dt = dt + np.log(-np.expm1(-dt)) - np.asarray(args["dt_bias"], np.float64)
    return cast_like(args, {"dt": dt})


def _strong_mlstm(args, rng, kind):
    g = strong_log_decays(rng, args["f"].shape, kind)
    return cast_like(args, {"f": -np.log(np.expm1(-g))})


def _ssd_ref(a, h0, seg, softplus=True):
    return ssd_reference(a["x"], a["dt"], a["A"], a["B"], a["C"], a.get("D"), a.get("dt_bias"),
                         softplus, h0, seg)


SPECS = [
    OpSpec("ssd", ssd, _make_ssd, _ssd_ref,
           lambda a: (a["x"].shape[0], H, N, P),
           diff_args=("x", "dt", "A", "B", "C", "D", "dt_bias"), strong=_strong_ssd),
    OpSpec("ssd[plain]", ssd, _make_ssd_plain,
           lambda a, h0, seg: _ssd_ref(a, h0, seg, softplus=False),
           lambda a: (a["x"].shape[0], H, N, P),
           diff_args=("x", "dt", "A", "B", "C"), strong=_strong_ssd,
           narrow=narrow_kernels("ssd", "dt is prepared before simple_gla's kernel, and ungrouped "
                                 "B and C are simple_gla's own case: ssd's cases run the rest")),
    # the state is a tuple (C, n, m); the contract suite compares it leaf by leaf (see mlstm.py:
    # both impls carry the recurrent stabiliser m_t itself)
    OpSpec("mlstm", mlstm, _make_mlstm,
           lambda a, s0, seg: mlstm_reference(a["q"], a["k"], a["v"], a["i"], a["f"], s0, seg,
                                              K**-0.5),
           lambda a: ((a["q"].shape[0], HM, K, V), (a["q"].shape[0], HM, K), (a["q"].shape[0], HM)),
           diff_args=("q", "k", "v", "i", "f"), strong=_strong_mlstm),
]
