"""Shared test helpers: relative-norm error, tolerances by dtype, realistic random inputs."""

from __future__ import annotations

import numpy as np

# ||a - b|| / ||b||, by input dtype. fp32 paths agree with float64 to ~1e-6; 2e-4 is the
# contract's bound. bf16 inputs are compared against the reference run on the same bf16 values.
TOL = {"float32": 2e-4, "bfloat16": 2e-2, "float16": 5e-3}


def rel_err(a, b) -> float:
    # complex arrays (a complex state) keep their imaginary parts
    dtype = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    a = np.asarray(a, dtype)
    b = np.asarray(b, dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all(), "non-finite values in result"
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def assert_close(a, b, tol, what=""):
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:.3g}"


def segments(rng, B, T, p=0.05):
    """Random packed-document ids [B, T] (int32) with a reset at roughly every 1/p tokens."""
    ids = np.cumsum(rng.uniform(size=(B, T)) < p, axis=1)
    return (ids % 3).astype(np.int32)  # ids repeat (A, B, A): resets follow changes, not values


def log_sigmoid_gates(rng, shape, lo=-4.0, hi=4.0):
    x = rng.uniform(lo, hi, size=shape)
    return (-np.logaddexp(0, -x)).astype(np.float32)


def l2norm(x, axis=-1):
    return (x / np.linalg.norm(x, axis=axis, keepdims=True)).astype(np.float32)
