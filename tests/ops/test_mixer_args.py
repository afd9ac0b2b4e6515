"""Bad arguments of kda, rwkv7, mamba3 and mamba3_mimo raise a ValueError naming the argument and
its shape at trace time (shapes only: nothing runs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from linear_jax import ops

B, T, H, K, V = 1, 5, 2, 8, 4
x = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
q, v, gate, vec = x(B, T, H, K), x(B, T, H, V), x(B, T, H), x(B, T, H, K)


def _raises(fn, *args, match, **kw):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *a: fn(*a, **kw), *args)


def test_kda():
    _raises(ops.kda, q, q, v, gate, gate, match=r"g must have rank 4 \[B, T, H, K\]")
    _raises(ops.kda, q, q, v, vec, vec, match=r"beta must have rank 3")
    _raises(ops.kda, q, q, v, vec, gate, initial_state=jnp.zeros((B, H, V, K)),
            match="initial_state must have shape")
    _raises(ops.kda, q, q, x(B, T, 3, V), x(B, T, 3, K), x(B, T, 3), match="multiple")


def test_rwkv7():
    _raises(ops.rwkv7, q, q, v, vec, vec, gate, match=r"b must have rank 4")
    _raises(ops.rwkv7, x(B, T, 1, K), x(B, T, 1, K), v, vec, vec, vec, match="same number of heads")
    _raises(ops.rwkv7, q, q, x(B, T + 1, H, V), vec, vec, vec, match="sequence length")


def test_mamba3():
    args = (q, q, v, gate, gate, gate)
    _raises(ops.mamba3, *args, x(B, T, H, K // 2 + 1), match="R <= N / 2")
    _raises(ops.mamba3, *args, x(B, T, H, 2), initial_state=jnp.zeros((B, H, K, V)),
            match="initial_state must be a tuple")
    _raises(ops.mamba3, *args, x(B, T, H, 2),
            initial_state=(jnp.zeros((B, H, K, V)), jnp.zeros((B, H, V)), jnp.zeros((B, H, V))),
            match=r"initial_state\[1\] must have shape")
    _raises(ops.mamba3, q, q, v, vec, gate, gate, x(B, T, H, 2), match="g must have rank 3")
    _raises(ops.mamba3, *args, x(B, T, H, 2), impl="fast", match="impl")


def test_mamba3_mimo():
    qr, vr = x(B, T, H, 2, K), x(B, T, H, 2, V)
    args = (qr, qr, vr, gate, gate, gate, x(B, T, H, 2))
    _raises(ops.mamba3_mimo, q, q, v, gate, gate, gate, x(B, T, H, 2), match=r"q must have rank 5")
    _raises(ops.mamba3_mimo, qr, qr, x(B, T, H, 3, V), *args[3:], match="rank r")
    _raises(ops.mamba3_mimo, *args,
            initial_state=(jnp.zeros((B, H, K, V)), jnp.zeros((B, H, K)), jnp.zeros((B, H, V))),
            match=r"initial_state\[1\] must have shape")
