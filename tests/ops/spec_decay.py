"""Specs for the decay family: linear_attention, simple_gla, gla.

Strong gates: g itself is the log decay, so every g (per head for simple_gla, per head and key
channel for gla) is drawn strong. linear_attention has no decay.
"""

from __future__ import annotations

import numpy as np

from linear_jax import ops
from tests.ops.specs import OpSpec, cast_like, resets, strong_log_decays
from tests.utils import log_sigmoid_gates

H, K, V = 2, 12, 10


def decay_reference(q, k, v, g, S0, seg, scale, normalize=False, eps=1e-6):
    """float64 loop: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t."""
    B, T, H_, K_ = q.shape
    V_ = v.shape[-1]
    if normalize:
        v = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], axis=-1)
        V_ += 1
    S = np.zeros((B, H_, K_, V_)) if S0 is None else S0.copy()
    r = np.zeros((B, T), bool) if seg is None else resets(seg)
    o = np.zeros((B, T, H_, V_))
    for t in range(T):
        S[r[:, t]] = 0.0
        if g is not None:
            dec = np.exp(g[:, t])
            S = (dec[..., None, None] if dec.ndim == 2 else dec[..., None]) * S
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o, S


def _qkv(rng, B, T, dtype):
    f = lambda *s: rng.standard_normal(s).astype(dtype)
    return {"q": f(B, T, H, K), "k": f(B, T, H, K), "v": f(B, T, H, V)}


def _make_la(rng, B, T, dtype):
    return _qkv(rng, B, T, dtype), {}


def _make_sgla(rng, B, T, dtype):
    return {**_qkv(rng, B, T, dtype), "g": log_sigmoid_gates(rng, (B, T, H)).astype(dtype)}, {}


def _make_gla(rng, B, T, dtype):
    return {**_qkv(rng, B, T, dtype), "g": log_sigmoid_gates(rng, (B, T, H, K)).astype(dtype)}, {}


def _make_la_norm(rng, B, T, dtype):
    a = _qkv(rng, B, T, dtype)
    a["q"], a["k"] = (np.exp(0.3 * a["q"]).astype(dtype), np.exp(0.3 * a["k"]).astype(dtype))
    return a, {"normalize": True}


def _strong(args, rng, kind):
    return cast_like(args, {"g": strong_log_decays(rng, args["g"].shape, kind)})


_state = lambda a: (a["q"].shape[0], a["v"].shape[2], a["q"].shape[3], a["v"].shape[3])

SPECS = [
    OpSpec("linear_attention", ops.linear_attention, _make_la,
           lambda a, S0, seg: decay_reference(a["q"], a["k"], a["v"], None, S0, seg, K**-0.5),
           _state, diff_args=("q", "k", "v")),
    OpSpec("linear_attention[normalize]", ops.linear_attention, _make_la_norm,
           lambda a, S0, seg: decay_reference(a["q"], a["k"], a["v"], None, S0, seg, K**-0.5,
                                              normalize=True),
           lambda a: _state(a)[:3] + (V + 1,), diff_args=("q", "k", "v")),
    OpSpec("simple_gla", ops.simple_gla, _make_sgla,
           lambda a, S0, seg: decay_reference(a["q"], a["k"], a["v"], a["g"], S0, seg, K**-0.5),
           _state, diff_args=("q", "k", "v", "g"), strong=_strong),
    OpSpec("gla", ops.gla, _make_gla,
           lambda a, S0, seg: decay_reference(a["q"], a["k"], a["v"], a["g"], S0, seg, K**-0.5),
           _state, diff_args=("q", "k", "v", "g"), strong=_strong),
]
