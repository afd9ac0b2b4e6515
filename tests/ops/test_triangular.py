"""The UT transform's solve against LAPACK's, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from linear_jax.ops.common.triangular import unit_lower_solve
from tests.utils import assert_close


def test_matches_lapack_values_and_gradients():
    rng = np.random.default_rng(0)
    L = np.tril(rng.standard_normal((2, 3, 16, 16)).astype(np.float32) * 0.5, -1)
    R = rng.standard_normal((2, 3, 16, 7)).astype(np.float32)
    lapack = lambda L, R: solve_triangular(L, R, lower=True, unit_diagonal=True)
    assert_close(unit_lower_solve(L, R), lapack(L, R), 1e-5, "solution")
    loss = lambda fn: jax.grad(lambda L, R: jnp.sum(jnp.sin(fn(L, R))), argnums=(0, 1))(L, R)
    (dL, dR), (dL_ref, dR_ref) = loss(unit_lower_solve), loss(lapack)
    assert_close(dR, dR_ref, 1e-5, "dR")
    assert_close(dL, np.tril(dL_ref, -1), 1e-5, "dL (strictly lower part)")
    assert np.all(np.triu(np.asarray(dL)) == 0.0)
