"""The convolutional view of a diagonal state-space layer (S4D), and FFT causal convolution.

A diagonal SSM per channel d with N complex modes, x'(t) = A x(t) + B u(t), y(t) = 2 Re(C x(t)),
discretised by zero-order hold with step dt = exp(log_dt):

    a = exp(dt A),      b = (exp(dt A) - 1) / A * B                      (`s4d_discretize`)
    h_t = a * h_{t-1} + b * u_t,      y_t = 2 Re(sum_n C_n h_t[n]) + D u_t  (recurrent view)
    y_t = sum_{l <= t} K[l] u_{t-l} + D u_t,  K[l] = 2 Re(sum_n C_n b_n a_n^l)  (convolutional view)

The factor 2 Re is the conjugate-pair convention of S4D: the N modes stand for N conjugate pairs,
so the kernel is real. Gu et al. 2021, "Combining Recurrent, Convolutional, and Continuous-time
Models with Linear State-Space Layers" (the two views of one layer); Gu et al. 2022, "On the
Parameterization and Initialization of Diagonal State Space Models" (S4D, this kernel). The
recurrent view is `diagonal_scan` with complex a; `causal_conv` runs the convolutional view with an
FFT of length 2T.

Numerics: exp(dt A) - 1 is formed as a complex expm1 (accurate when |dt A| is small, where the
plain difference loses digits); a^l is formed as exp(l dt Re A) (cos, sin)(l dt Im A), so no power
of a complex number is accumulated. A must be non-zero (S4D uses Re A < 0).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from linear_jax.ops import _checks


def _parts(name: str, X, D: int):
    """A complex array, a real array or a (real, imag) pair -> float32 (real, imag) [D, N]."""
    if isinstance(X, (tuple, list)):
        if len(X) != 2:
            raise ValueError(f"{name} given as parts must be a (real, imag) pair, got {len(X)}")
        re, im = X
    elif jnp.issubdtype(jnp.result_type(X), jnp.complexfloating):
        re, im = jnp.real(X), jnp.imag(X)
    else:
        re, im = X, jnp.zeros_like(X)
    for part in (re, im):
        _checks.check_rank(name, part, 2, "[D, N]")
        _checks.check_float(name, part)
    if jnp.shape(re) != jnp.shape(im) or jnp.shape(re)[0] != D:
        raise ValueError(f"{name} must have shape [D, N] with D = {D} (log_dt's length), got parts "
                         f"{_checks.shape_str(re)} and {_checks.shape_str(im)}")
    return jnp.asarray(re, jnp.float32), jnp.asarray(im, jnp.float32)


def _expm1_complex(x, y):
    """exp(x + iy) - 1 without cancellation: cos y - 1 = -2 sin^2(y / 2)."""
    re = jnp.expm1(x) * jnp.cos(y) - 2.0 * jnp.sin(y / 2) ** 2
    return lax.complex(re, jnp.exp(x) * jnp.sin(y))


def _discretize(log_dt, A, B):
    _checks.check_rank("log_dt", log_dt, 1, "[D]")
    _checks.check_float("log_dt", log_dt)
    D = jnp.shape(log_dt)[0]
    (a_re, a_im), (b_re, b_im) = _parts("A", A, D), _parts("B", B, D)
    if a_re.shape != b_re.shape:
        raise ValueError(f"A and B must have the same shape [D, N], got {a_re.shape} and "
                         f"{b_re.shape}")
    dt = jnp.exp(jnp.asarray(log_dt, jnp.float32))[:, None]
    x, y = dt * a_re, dt * a_im                                     # dt A
    b = _expm1_complex(x, y) / lax.complex(a_re, a_im) * lax.complex(b_re, b_im)
    return x, y, b


def s4d_discretize(log_dt, A, B):
    """ZOH discretisation: returns (a, b), complex64 [D, N], with h_t = a h_{t-1} + b u_t.

    A, B: complex [D, N], real [D, N] or (real, imag) pairs; log_dt [D].
    """
    x, y, b = _discretize(log_dt, A, B)
    return jnp.exp(lax.complex(x, y)), b


def s4d_kernel(log_dt, A, B, C, L: int):
    """Real convolution kernel K [D, L] float32 of the ZOH-discretised diagonal SSM.

    log_dt [D]; A, B, C complex [D, N], real [D, N] or (real, imag) pairs.
    """
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L must be a positive int (the kernel length), got {L!r}")
    x, y, b = _discretize(log_dt, A, B)
    c_re, c_im = _parts("C", C, x.shape[0])
    if c_re.shape != x.shape:
        raise ValueError(f"C must have the shape of A, {x.shape}, got {c_re.shape}")
    w = lax.complex(c_re, c_im) * b                                 # [D, N]
    l = jnp.arange(L, dtype=jnp.float32)
    mag = jnp.exp(x[..., None] * l)                                 # |a|^l, [D, N, L]
    phase = y[..., None] * l
    re = jnp.real(w)[..., None] * jnp.cos(phase) - jnp.imag(w)[..., None] * jnp.sin(phase)
    return 2.0 * jnp.sum(mag * re, axis=1)


def causal_conv(x, kernel, D_skip=None):
    """y_t = sum_{l <= t} kernel[:, l] x_{t-l} (+ D_skip * x_t), by FFT of length 2T.

    x [B, T, D]; kernel [D, L] (taps past T never reach an output and are dropped); D_skip [D].
    Computes in float32; returns y [B, T, D] in x's dtype.
    """
    _checks.check_rank("x", x, 3, "[B, T, D]")
    _checks.check_float("x", x)
    _checks.check_rank("kernel", kernel, 2, "[D, L]")
    _checks.check_float("kernel", kernel)
    _, T, D = x.shape
    if kernel.shape[0] != D:
        raise ValueError(f"kernel must have shape [D, L] with D = {D} (x's channels), got "
                         f"kernel{_checks.shape_str(kernel)}")
    if D_skip is not None:
        _checks.check_float("D_skip", D_skip)
        _checks.check_shape("D_skip", D_skip, (D,), "[D]")
    u = x.astype(jnp.float32)
    k = kernel.astype(jnp.float32)[:, :T].T                         # [L', D]
    n = 2 * T
    y = jnp.fft.irfft(jnp.fft.rfft(u, n=n, axis=1) * jnp.fft.rfft(k, n=n, axis=0), n=n, axis=1)
    y = y[:, :T]
    if D_skip is not None:
        y = y + D_skip.astype(jnp.float32) * u
    return y.astype(x.dtype)
