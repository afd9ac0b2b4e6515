"""Specs for the delta-rule family: delta_rule (beta in [0, 1], in [0, 2], exact), gated_delta_rule,
delta_product (with and without a gate).

Strong gates (gated_delta_rule, delta_product[g]): g [B, T, H] is the log decay applied before each
step, so every g is drawn strong; beta and the keys stay as drawn. delta_rule and the ungated
delta_product have no decay.
"""

from __future__ import annotations

import numpy as np

from linear_jax.ops.delta_product import delta_product
from linear_jax.ops.delta_rule import delta_rule, gated_delta_rule
from tests.ops.specs import OpSpec, cast_like, narrow_kernels, resets, strong_log_decays
from tests.utils import l2norm, log_sigmoid_gates

H, K, V = 2, 12, 10


def householder_step(S, k, v, beta):
    """float64: (I - beta k k^T) S + beta k v^T, with the matrix formed explicitly. k [B,H,K]."""
    eye = np.eye(k.shape[-1])
    P = eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]
    write = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    return np.einsum("bhij,bhjv->bhiv", P, S) + write


def exact_beta(k, beta):
    """float64 EFLA beta: (1 - exp(-beta ||k||^2)) / ||k||^2 (||k|| > 0 here)."""
    lam = np.sum(k * k, axis=-1)
    return -np.expm1(-beta * lam) / lam


def _heads(x, H_, axis):
    return np.repeat(x, H_ // x.shape[axis], axis=axis)


def _f64(*xs):
    # explicit: bf16 arrays (ml_dtypes) are not np.floating and would otherwise compute in bf16
    return [None if x is None else np.asarray(x, np.float64) for x in xs]


def delta_reference(q, k, v, beta, g, S0, seg, scale, exact=False):
    """float64 loop: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""
    q, k, v, beta, g, S0 = _f64(q, k, v, beta, g, S0)
    B, T, H_, V_ = v.shape
    q, k = _heads(q, H_, 2), _heads(k, H_, 2)
    if exact:
        beta = exact_beta(k, beta)
    S = np.zeros((B, H_, q.shape[-1], V_)) if S0 is None else S0.copy()
    r = np.zeros((B, T), bool) if seg is None else resets(seg)
    o = np.zeros((B, T, H_, V_))
    for t in range(T):
        S[r[:, t]] = 0.0
        if g is not None:
            S = np.exp(g[:, t])[..., None, None] * S
        S = householder_step(S, k[:, t], v[:, t], beta[:, t])
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def product_reference(q, k, v, beta, g, S0, seg, scale):
    """float64 loop over tokens: decay once (if g), then n Householder steps, then read q."""
    q, k, v, beta, g, S0 = _f64(q, k, v, beta, g, S0)
    B, T, n, H_, V_ = v.shape
    q, k = _heads(q, H_, 2), _heads(k, H_, 3)
    S = np.zeros((B, H_, q.shape[-1], V_)) if S0 is None else S0.copy()
    r = np.zeros((B, T), bool) if seg is None else resets(seg)
    o = np.zeros((B, T, H_, V_))
    for t in range(T):
        S[r[:, t]] = 0.0
        if g is not None:
            S = np.exp(g[:, t])[..., None, None] * S
        for i in range(n):
            S = householder_step(S, k[:, t, i], v[:, t, i], beta[:, t, i])
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _make(rng, B, T, dtype, Hk=H, n=None, beta_max=1.0, key_norm=None, gate=False):
    """q, k [B,T,Hk,K] (k [B,T,n,Hk,K] for a product), l2-normalised keys (times a random norm in
    `key_norm` when given), v [B,T,(n,)H,V], beta in (0, beta_max), g log-sigmoid gates [B,T,H]."""
    steps = () if n is None else (n,)
    k = l2norm(rng.standard_normal((B, T, *steps, Hk, K)))
    if key_norm is not None:
        k = k * rng.uniform(*key_norm, size=k.shape[:-1] + (1,))
    args = {"q": rng.standard_normal((B, T, Hk, K)), "k": k,
            "v": rng.standard_normal((B, T, *steps, H, V)),
            "beta": beta_max * _sigmoid(rng.standard_normal((B, T, *steps, H)))}
    if gate:
        args["g"] = log_sigmoid_gates(rng, (B, T, H))
    return {n_: np.asarray(x).astype(dtype) for n_, x in args.items()}


_state = lambda a: (a["q"].shape[0], a["v"].shape[-2], K, V)
_scale = K**-0.5


def _strong(args, rng, kind):
    return cast_like(args, {"g": strong_log_decays(rng, args["g"].shape, kind)})


def _delta_spec(name, fn, make, diff, exact=False, **kw):
    ref = lambda a, S0, seg: delta_reference(a["q"], a["k"], a["v"], a["beta"], a.get("g"), S0,
                                             seg, _scale, exact=exact)
    return OpSpec(name, fn, make, ref, _state, diff_args=diff,
                  strong=_strong if "g" in diff else None, **kw)


def _product_spec(name, make, diff):
    ref = lambda a, S0, seg: product_reference(a["q"], a["k"], a["v"], a["beta"], a.get("g"), S0,
                                               seg, _scale)
    return OpSpec(name, delta_product, make, ref, _state, diff_args=diff,
                  strong=_strong if "g" in diff else None)


SPECS = [
    _delta_spec("delta_rule", delta_rule, lambda rng, B, T, dt: (_make(rng, B, T, dt), {}),
                ("q", "k", "v", "beta")),
    _delta_spec("delta_rule[beta0-2]", delta_rule,
                lambda rng, B, T, dt: (_make(rng, B, T, dt, beta_max=2.0), {}),
                ("q", "k", "v", "beta")),
    _delta_spec("delta_rule[exact]", delta_rule,
                lambda rng, B, T, dt: (_make(rng, B, T, dt, beta_max=2.0, key_norm=(0.2, 2.0)),
                                       {"exact": True}),
                ("q", "k", "v", "beta"), exact=True,
                narrow=narrow_kernels("delta_rule", "efla_beta runs before the kernel, which "
                                      "then sees a beta in (0, 2) as in delta_rule[beta0-2]")),
    _delta_spec("gated_delta_rule", gated_delta_rule,
                lambda rng, B, T, dt: (_make(rng, B, T, dt, Hk=1, gate=True), {}),
                ("q", "k", "v", "beta", "g")),
    _product_spec("delta_product", lambda rng, B, T, dt: (_make(rng, B, T, dt, n=2, beta_max=2.0),
                                                          {}),
                  ("q", "k", "v", "beta")),
    _product_spec("delta_product[g]",
                  lambda rng, B, T, dt: (_make(rng, B, T, dt, Hk=1, n=3, gate=True), {}),
                  ("q", "k", "v", "beta", "g")),
]
