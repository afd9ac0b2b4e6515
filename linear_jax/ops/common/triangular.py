"""X = (I + L)^{-1} R for strictly lower-triangular L, batched over leading axes.

The delta rule's UT transform solves this once per chunk. LAPACK's batched triangular solve, which
`jax.scipy.linalg.solve_triangular` reaches on a CPU, was seen to deadlock in jaxlib 0.10's thread
pool during long training runs, so the solve is written here: the inverse by recursive doubling
(`linear_jax.kernels.tiles.unit_lower_inverse`, the algorithm of the GPU and TPU kernels too:
2 log2(C) batched [C, C] products, C a power of two; other C are padded with identity rows), then
one matrix product. The custom VJP keeps the inverse:

    dR = (I + L)^{-T} dX,        dL = -strict_lower(dR X^T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels import tiles


def _mm(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def unit_lower_inverse(L):
    """(I + L)^{-1} for strictly lower-triangular L [..., C, C]."""
    C = L.shape[-1]
    P = 1 << max(C - 1, 0).bit_length()
    Lp = jnp.pad(L, [(0, 0)] * (L.ndim - 2) + [(0, P - C), (0, P - C)])
    row, col = tiles.iotas(P)
    return tiles.unit_lower_inverse(Lp, row, col, _mm)[..., :C, :C]


@jax.custom_vjp
def unit_lower_solve(L, R):
    """X with (I + L) X = R; L [..., C, C] strictly lower, R [..., C, D]."""
    return _mm(unit_lower_inverse(L), R)


def _fwd(L, R):
    inv = unit_lower_inverse(L)
    X = _mm(inv, R)
    return X, (inv, X)


def _bwd(res, dX):
    inv, X = res
    dR = _mm(jnp.swapaxes(inv, -1, -2), dX)
    C = X.shape[-2]
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    dL = jnp.where(strict, -_mm(dR, jnp.swapaxes(X, -1, -2)), 0.0)
    return dL, dR


unit_lower_solve.defvjp(_fwd, _bwd)
