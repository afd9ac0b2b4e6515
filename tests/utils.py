"""Shared test helpers: relative-norm error, tolerances by dtype, realistic random inputs."""

from __future__ import annotations

import importlib.metadata

import numpy as np


def _fast_compile_xla_flags() -> str:
    """XLA flags that make the CPU backend compile faster; it computes the same functions (rounded
    differently in places). Compiling dominates the suite and its arrays are tiny:
    - without LLVM's optimisations: about half the compile time (the smoke tests and a contract
      sample took 0.5x and 0.6x as long);
    - (jaxlib 0.10) each fusion through XLA's elemental emitters instead of its MLIR fusion
      emitters, and the module compiled by LLVM in one piece instead of split for a thread pool
      that two pytest workers on two cores do not have: with both, the suite's tests took 0.65x
      the worker time (the contract 0.6x, the layer invariants 0.5x, the Triton interpreter
      tests 0.6x), its wall time 0.65x. Only on jaxlib 0.10, where they were measured: an XLA
      flag that XLA does not know is fatal."""
    flags = "--xla_backend_optimization_level=0"
    version = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]
                    if p.isdigit())
    if (0, 10) <= version < (0, 11):
        flags += " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
    return flags


# for tests/conftest.py and the tests' subprocesses (set before a backend starts)
FAST_COMPILE_XLA_FLAGS = _fast_compile_xla_flags()


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
