"""Specs for the element-wise scans: hgrn, diagonal_scan (real; complex through its parts),
selective_scan (plain; grouped with every option), short_conv.

Strong gates, per op (short_conv has no decay):
- hgrn: g is the log decay; every g is drawn strong.
- diagonal_scan: the decay is |a|, so every log|a| is drawn strong; a real transition keeps a random
  sign, a complex one a random phase.
- selective_scan: the decay of state (d, n) is exp(dt A[d, n]) with dt = delta (plain) or
  softplus(delta + delta_bias): every dt and every -A is drawn in [sqrt 15, 5] (both sqrt 20 for
  "constant"), so every dt A lies in [-25, -15] (is -20); delta is set to give that dt.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.hgrn import hgrn
from linear_jax.ops.selective_scan import selective_scan
from linear_jax.ops.short_conv import short_conv
from tests.ops.specs import STRONG, OpSpec, cast_like, resets, strong_log_decays
from tests.utils import log_sigmoid_gates

D, N, G, W = 6, 3, 2, 4


def _f64(*xs):
    # explicit: bf16 arrays (ml_dtypes) are not np.floating and would otherwise compute in bf16
    return [None if x is None else np.asarray(x, np.float64) for x in xs]


def _resets(seg, B, T):
    return np.zeros((B, T), bool) if seg is None else resets(seg)


def diagonal_reference(a, x, h0, seg):
    """float64 / complex128 loop: h_t = a_t h_{t-1} + x_t (a reset zeroes h before step t)."""
    a, x = np.asarray(a), np.asarray(x)
    B, T, D_ = x.shape
    dtype = np.result_type(a, x, np.float64, *([] if h0 is None else [np.asarray(h0)]))
    h = np.zeros((B, D_), dtype) if h0 is None else np.array(h0, dtype)
    r = _resets(seg, B, T)
    out = np.zeros((B, T, D_), dtype)
    for t in range(T):
        h[r[:, t]] = 0.0
        h = a[:, t] * h + x[:, t]
        out[:, t] = h
    return out, h


def hgrn_reference(x, g, h0, seg):
    x, g, h0 = _f64(x, g, h0)
    return diagonal_reference(np.exp(g), x, h0, seg)


def selective_reference(u, delta, A, B_, C_, D_=None, z=None, delta_bias=None,
                        delta_softplus=False, h0=None, seg=None):
    """float64 loop of Mamba's selective_scan_ref, laid out [B, T, ...]."""
    u, delta, A, B_, C_, D_, z, delta_bias, h0 = _f64(u, delta, A, B_, C_, D_, z, delta_bias, h0)
    Bsz, T, Dm = u.shape
    dt = delta + (0.0 if delta_bias is None else delta_bias)
    if delta_softplus:
        dt = np.logaddexp(0.0, dt)
    groups = lambda M: np.repeat(M if M.ndim == 4 else M[:, :, None], Dm // (
        1 if M.ndim == 3 else M.shape[2]), axis=2)               # [B, T, D, N]
    Bd, Cd = groups(B_), groups(C_)
    h = np.zeros((Bsz, Dm, A.shape[1])) if h0 is None else h0.copy()
    r = _resets(seg, Bsz, T)
    y = np.zeros((Bsz, T, Dm))
    for t in range(T):
        h[r[:, t]] = 0.0
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bd[:, t]
        y[:, t] = np.sum(h * Cd[:, t], axis=-1)
    if D_ is not None:
        y = y + D_ * u
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y, h


def short_conv_reference(x, weight, bias, activation, S0, seg):
    """float64, by direct indexing: y_t reads x_{t-W+1..t}, the cache for indices < 0, and only
    inputs of its own document (the cache belongs to the first document)."""
    x, weight, bias, S0 = _f64(x, weight, bias, S0)
    Bsz, T, Dm = x.shape
    Wn = weight.shape[0]
    cache = np.zeros((Bsz, Wn - 1, Dm)) if S0 is None else S0
    xp = np.concatenate([cache, x], axis=1)                      # index s of x is s + W - 1
    doc = np.cumsum(_resets(seg, Bsz, T), axis=1)
    docp = np.concatenate([np.zeros((Bsz, Wn - 1), int), doc], axis=1)
    y = np.zeros((Bsz, T, Dm))
    for b in range(Bsz):
        for t in range(T):
            for w in range(Wn):
                s = t + w                                        # position in xp
                if docp[b, s] == doc[b, t]:
                    y[b, t] += weight[w] * xp[b, s]
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = y / (1.0 + np.exp(-y))
    new = xp[:, T:].copy()
    new[docp[:, T:] != doc[:, -1:]] = 0.0
    return y, new


def diagonal_scan_parts(a_re, a_im, x_re, x_im, *, initial_state=None, **kw):
    """The complex scan seen through real and imaginary parts, stacked on a last axis (state
    [B, D, 2]), so the contract's dtype, split, decode and gradient tests reach the complex path."""
    cplx = lambda re, im: lax.complex(jnp.asarray(re, jnp.float32), jnp.asarray(im, jnp.float32))
    h0 = None if initial_state is None else cplx(initial_state[..., 0], initial_state[..., 1])
    h, hT = diagonal_scan(cplx(a_re, a_im), cplx(x_re, x_im), initial_state=h0, **kw)
    parts = lambda z: jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)
    return parts(h).astype(jnp.asarray(x_re).dtype), parts(hT)


def _cast(args, dtype):
    return {n: np.asarray(x).astype(dtype) for n, x in args.items()}


def _make_hgrn(rng, B, T, dtype):
    return _cast({"x": rng.standard_normal((B, T, D)),
                  "g": log_sigmoid_gates(rng, (B, T, D))}, dtype), {}


def _make_diag(rng, B, T, dtype):
    # negative transitions included: the scan is not restricted to decays
    return _cast({"a": rng.uniform(-0.99, 0.99, (B, T, D)),
                  "x": rng.standard_normal((B, T, D))}, dtype), {}


def _make_diag_complex(rng, B, T, dtype):
    a = rng.uniform(0.3, 0.999, (B, T, D)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (B, T, D)))
    x = rng.standard_normal((B, T, D)) + 1j * rng.standard_normal((B, T, D))
    return _cast({"a_re": a.real, "a_im": a.imag, "x_re": x.real, "x_im": x.imag}, dtype), {}


def _complex_reference(a, S0, seg):
    a = {n: np.asarray(x, np.float64) for n, x in a.items()}
    h0 = None if S0 is None else S0[..., 0] + 1j * S0[..., 1]
    h, hT = diagonal_reference(a["a_re"] + 1j * a["a_im"], a["x_re"] + 1j * a["x_im"], h0, seg)
    parts = lambda z: np.stack([z.real, z.imag], axis=-1)
    return parts(h), parts(hT)


def _make_selective(rng, B, T, dtype):
    # without softplus dt is delta itself: positive, so exp(dt A) is a decay
    return _cast({"u": rng.standard_normal((B, T, D)), "delta": rng.uniform(0.01, 0.5, (B, T, D)),
                  "A": -rng.uniform(0.5, 4.0, (D, N)), "B": rng.standard_normal((B, T, N)),
                  "C": rng.standard_normal((B, T, N))}, dtype), {}


def _make_selective_full(rng, B, T, dtype):
    args = {"u": rng.standard_normal((B, T, D)), "delta": rng.standard_normal((B, T, D)),
            "A": -rng.uniform(0.5, 4.0, (D, N)), "B": rng.standard_normal((B, T, G, N)),
            "C": rng.standard_normal((B, T, G, N)), "D": rng.standard_normal(D),
            "z": rng.standard_normal((B, T, D)), "delta_bias": rng.uniform(-3.0, 0.0, D)}
    return _cast(args, dtype), {"delta_softplus": True}


def _make_short_conv(rng, B, T, dtype):
    return _cast({"x": rng.standard_normal((B, T, D)), "weight": 0.5 * rng.standard_normal((W, D)),
                  "bias": 0.1 * rng.standard_normal(D)}, dtype), {"activation": "silu"}


def _strong_hgrn(args, rng, kind):
    return cast_like(args, {"g": strong_log_decays(rng, args["g"].shape, kind)})


def _strong_diag(args, rng, kind):
    mag = np.exp(strong_log_decays(rng, args["a"].shape, kind))
    return cast_like(args, {"a": mag * rng.choice([-1.0, 1.0], mag.shape)})


def _strong_diag_complex(args, rng, kind):
    a = np.exp(strong_log_decays(rng, args["a_re"].shape, kind)
               + 1j * rng.uniform(-np.pi, np.pi, args["a_re"].shape))
    return cast_like(args, {"a_re": a.real, "a_im": a.imag})


def _root_of_strong(rng, shape, kind):
    """Factors in [sqrt 15, 5] (all sqrt 20 for "constant"): a product of two lies in [15, 25]."""
    assert kind in STRONG, kind
    return rng.uniform(15.0**0.5, 5.0, shape) if kind == "uniform" else np.full(shape, 20.0**0.5)


def _strong_selective(args, rng, kind):
    dt = _root_of_strong(rng, args["delta"].shape, kind)
    new = {"A": -_root_of_strong(rng, args["A"].shape, kind), "delta": dt}
    if "delta_bias" in args:     # softplus(delta + bias) = dt; softplus^-1(y) = y + log(1 - e^-y)
        new["delta"] = dt + np.log(-np.expm1(-dt)) - np.asarray(args["delta_bias"], np.float64)
    return cast_like(args, new)


_state_bd = lambda a: (next(iter(a.values())).shape[0], D)

SPECS = [
    OpSpec("hgrn", hgrn, _make_hgrn,
           lambda a, S0, seg: hgrn_reference(a["x"], a["g"], S0, seg),
           _state_bd, diff_args=("x", "g"), strong=_strong_hgrn),
    OpSpec("diagonal_scan", diagonal_scan, _make_diag,
           lambda a, S0, seg: diagonal_reference(*_f64(a["a"], a["x"], S0), seg),
           _state_bd, diff_args=("a", "x"), strong=_strong_diag),
    OpSpec("diagonal_scan[complex]", diagonal_scan_parts, _make_diag_complex, _complex_reference,
           lambda a: _state_bd(a) + (2,), diff_args=("a_re", "a_im", "x_re", "x_im"),
           strong=_strong_diag_complex),
    OpSpec("selective_scan", selective_scan, _make_selective,
           lambda a, S0, seg: selective_reference(a["u"], a["delta"], a["A"], a["B"], a["C"],
                                                  h0=S0, seg=seg),
           lambda a: (a["u"].shape[0], D, N), diff_args=("u", "delta", "A", "B", "C"),
           strong=_strong_selective),
    OpSpec("selective_scan[grouped,D,z,bias,softplus]", selective_scan, _make_selective_full,
           lambda a, S0, seg: selective_reference(a["u"], a["delta"], a["A"], a["B"], a["C"],
                                                  a["D"], a["z"], a["delta_bias"], True, S0, seg),
           lambda a: (a["u"].shape[0], D, N),
           diff_args=("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
           strong=_strong_selective),
    OpSpec("short_conv", short_conv, _make_short_conv,
           lambda a, S0, seg: short_conv_reference(a["x"], a["weight"], a["bias"], "silu", S0, seg),
           lambda a: (a["x"].shape[0], W - 1, D), diff_args=("x", "weight", "bias"),
           chunked=False),
]
