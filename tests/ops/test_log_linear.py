"""Log-linear attention beyond the contract suite (tests/ops/spec_loglinear.py runs that): the
recurrence is the paper's hierarchical matrix; lambda = 1 gives the base op and the level sum its
state; argument errors; the layers reduce to their base layers at lambda = 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax import ops
from linear_jax.layers import make_mixer
from tests.ops import spec_loglinear as sp
from tests.utils import TOL, assert_close, segments


def test_recurrence_is_the_hierarchical_matrix():
    """The float64 Fenwick loop (merge rule) == O = (Q K^T * M^S * M^H) V with the paper's level
    bit_length(i XOR j), at L = 6 levels for T = 29 (exact buckets, nothing pooled)."""
    rng = np.random.default_rng(0)
    args, _ = sp._make(rng, 2, 29, np.float64)
    lam = rng.uniform(0.2, 1.5, (2, 29, sp.H, 6))
    want = sp.matrix_reference(args["q"], args["k"], args["v"], args["g"], lam, 0.5)
    got, _ = sp.fenwick_reference(args["q"], args["k"], args["v"], args["g"], None, lam, None,
                                  None, 0.5)
    assert_close(got, want, 1e-12, "Fenwick loop vs hierarchical matrix")


@pytest.fixture(scope="module")
def drawn():
    rng = np.random.default_rng(1)
    args, _ = sp._make(rng, 2, 21, np.float32, delta=True)
    return args, segments(rng, 2, 21, p=0.1)


def test_unit_level_weights_give_the_base_op(drawn):
    args, seg = drawn
    ones = np.ones_like(args["level_weights"])
    q, k, v, g, beta = (args[n] for n in ("q", "k", "v", "g", "beta"))
    run = jax.jit(lambda: (
        ops.log_linear_simple_gla(q, k, v, g, ones, segment_ids=seg, chunk_size=8, impl="chunk"),
        ops.simple_gla(q, k, v, g, segment_ids=seg, chunk_size=8, impl="chunk"),
        ops.log_linear_gated_delta_rule(q, k, v, g, beta, ones, segment_ids=seg, chunk_size=8,
                                        impl="chunk"),
        ops.gated_delta_rule(q, k, v, g, beta, segment_ids=seg, chunk_size=8, impl="chunk")))
    (o1, S1), (o2, S2), (o3, S3), (o4, S4) = run()
    assert_close(o1, o2, TOL["float32"], "log-linear simple GLA at lambda = 1")
    assert_close(S1.levels.sum(2), S2, TOL["float32"], "level sum")
    assert_close(o3, o4, TOL["float32"], "log-linear Gated DeltaNet at lambda = 1")
    assert_close(S3.levels.sum(2), S4, TOL["float32"], "level sum")


def test_bad_arguments_raise(drawn):
    args, _ = drawn
    q, k, v, g, lam = (args[n] for n in ("q", "k", "v", "g", "level_weights"))
    with pytest.raises(ValueError, match="level_weights"):
        ops.log_linear_simple_gla(q, k, v, g, lam[:, :-1])
    with pytest.raises(ValueError, match="initial_state"):
        ops.log_linear_simple_gla(q, k, v, g, lam, initial_state=np.zeros((2, 2, 4, 12, 10)))
    bad = (np.zeros((2, 2, 3, 12, 10), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="initial_state.levels"):
        ops.log_linear_simple_gla(q, k, v, g, lam, initial_state=bad)


def test_log_linear_mamba2_at_unit_weights_is_mamba2():
    """Same seed, same base parameters (the level projection is built last); with the level
    projection zeroed every lambda is softplus(softplus^-1(1)) = 1."""
    x = jax.random.normal(jax.random.key(0), (2, 13, 32))
    ll = make_mixer("log_linear_mamba2", 32, 2, rngs=nnx.Rngs(0), chunk_size=8, num_levels=3)
    base = make_mixer("mamba2", 32, 2, rngs=nnx.Rngs(0), chunk_size=8)
    ll.levels.proj.kernel[...] = jnp.zeros_like(ll.levels.proj.kernel[...])
    y_ll, _ = nnx.jit(lambda m, x: m(x))(ll, x)
    y, _ = nnx.jit(lambda m, x: m(x))(base, x)
    assert_close(y_ll, y, TOL["float32"], "log-linear Mamba-2 vs Mamba-2")
