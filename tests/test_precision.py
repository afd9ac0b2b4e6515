"""64-bit inputs (with `jax_enable_x64`): the ops compute in 32 bits, so a float64 or complex128
argument raises a ValueError naming it (`linear_jax.ops._checks.check_precision`) instead of
being quietly computed and returned in float32. 32-bit inputs under x64 run as before."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from linear_jax import ops

B, T, H, K = 1, 8, 2, 4


def _args(dtype):
    x = jnp.ones((B, T, H, K), dtype)
    g = -jnp.ones((B, T, H), jnp.float32)
    return x, g


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("case", ["q", "initial_state", "beta", "diagonal_scan", "ssd_A",
                                  "short_conv"])
def test_float64_raises_naming_the_argument(x64, case):
    x32, g = _args(jnp.float32)
    wide = lambda a: a.astype(jnp.float64)
    calls = {
        "q": (lambda: ops.simple_gla(wide(x32), x32, x32, g), "q"),
        "initial_state": (lambda: ops.gla(x32, x32, x32, g[..., None] * x32,
                                          initial_state=jnp.zeros((B, H, K, K), jnp.float64)),
                          "initial_state"),
        "beta": (lambda: ops.delta_rule(x32, x32, x32, wide(-g) / 2), "beta"),
        "diagonal_scan": (lambda: ops.diagonal_scan(jnp.full((B, T, 3), 0.5, jnp.complex128),
                                                    jnp.ones((B, T, 3), jnp.complex64)), "a"),
        "ssd_A": (lambda: ops.ssd(x32, -g, -jnp.ones((H,), jnp.float64), x32[:, :, :1],
                                  x32[:, :, :1]), "A"),
        "short_conv": (lambda: ops.short_conv(jnp.ones((B, T, 3), jnp.float64),
                                              jnp.ones((4, 3), jnp.float32)), "x"),
    }
    call, name = calls[case]
    with pytest.raises(ValueError, match=rf"^{name}\(.*\) has dtype (float64|complex128): "
                                         r".*32 bits"):
        call()


def test_float32_under_x64_keeps_float32_states(x64):
    x32, g = _args(jnp.float32)
    o, S = ops.simple_gla(x32, x32, x32, g, impl="chunk")
    assert o.dtype == S.dtype == jnp.float32
