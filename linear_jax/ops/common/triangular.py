"""X = (I + L)^{-1} R for strictly lower-triangular L, batched over leading axes.

The delta rule's UT transform solves this once per chunk. LAPACK's batched triangular solve, which
`jax.scipy.linalg.solve_triangular` reaches on a CPU, was seen to deadlock in jaxlib 0.10's thread
pool during long training runs, so the solve is written here: the inverse by forward substitution
(row i of (I + L)^{-1} is e_i - L_i (I + L)^{-1}, the rows above it already known; C^3 per chunk, no
larger than the products around it), then one matrix product. The custom VJP keeps the inverse:

    dR = (I + L)^{-T} dX,        dL = -strict_lower(dR X^T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _mm(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def unit_lower_inverse(L):
    """(I + L)^{-1} for strictly lower-triangular L [..., C, C]."""
    C = L.shape[-1]
    eye = jnp.eye(C, dtype=L.dtype)

    def row(i, inv):
        # rows >= i of `inv` are still zero and L[i, j] = 0 for j >= i, so the full product is exact
        L_i = lax.dynamic_slice_in_dim(L, i, 1, axis=-2)
        r = eye[i] - _mm(L_i, inv)[..., 0, :]
        return lax.dynamic_update_index_in_dim(inv, r, i, axis=-2)

    return lax.fori_loop(0, C, row, jnp.zeros_like(L))


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
