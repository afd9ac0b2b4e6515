"""LION (bidirectional linear attention): the full, recurrent and chunk forms against a float64
loop over the mask's definition, for LION-LIT, -D and -S, with packed documents; gradients of the
chunk form against the full form; errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax import ops
from tests.utils import TOL, assert_close, log_sigmoid_gates, segments

B, T, H, K, V, C = 2, 23, 2, 6, 5, 8
KINDS = ("lit", "d", "s")


def lion_reference(q, k, v, g, seg, scale, normalize, eps=1e-6):
    """float64: y_i = sum_j M_ij (q_i . k_j) v_j [/ sum_j M_ij q_i . k_j], M_ij the product of the
    decays exp(g_s) over min(i, j) < s <= max(i, j), 0 across documents."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    doc = np.zeros((B, T), int) if seg is None else np.cumsum(
        np.concatenate([np.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], 1), 1)
    o = np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                num, den = np.zeros(V), 0.0
                for j in range(T):
                    if doc[b, i] != doc[b, j]:
                        continue
                    lo, hi = min(i, j), max(i, j)
                    m = 1.0 if g is None else np.exp(np.sum(g[b, lo + 1: hi + 1, h]))
                    a = m * scale * (q[b, i, h] @ k[b, j, h])
                    num, den = num + a * v[b, j, h], den + a
                o[b, i, h] = num / (den + eps) if normalize else num
    return o


def _draw(kind, seed=0):
    rng = np.random.default_rng(seed)
    # positive features (LION's shifted SiLU is positive too): row sums stay away from 0
    q, k = (np.exp(0.3 * rng.standard_normal((B, T, H, K))).astype(np.float32) for _ in "qk")
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = {"lit": None,
         "d": np.broadcast_to(np.log([0.9, 0.7]), (B, T, H)).astype(np.float32),
         "s": log_sigmoid_gates(rng, (B, T, H), lo=-1.0, hi=4.0)}[kind]
    return q, k, v, g, segments(rng, B, T, p=0.1)


@functools.cache
def _fn(impl, normalize):
    return jax.jit(lambda q, k, v, g, seg: ops.lion(q, k, v, g, normalize=normalize,
                                                    segment_ids=seg, chunk_size=C,
                                                    impl=impl)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_three_forms_match_float64(kind):
    q, k, v, g, seg = _draw(kind)
    for s in (seg, None):
        want = lion_reference(q, k, v, g, s, K**-0.5, True)
        for impl in ("full", "recurrent", "chunk"):
            assert_close(_fn(impl, True)(q, k, v, g, s), want, TOL["float32"],
                         f"LION-{kind} {impl} (segments={s is not None})")


def test_bf16_inputs():
    q, k, v, g, seg = _draw("s", 1)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    o = _fn("chunk", True)(bf(q), bf(k), bf(v), bf(g), seg)
    f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
    want = lion_reference(f64(bf(q)), f64(bf(k)), f64(bf(v)), f64(bf(g)), seg, K**-0.5, True)
    assert o.dtype == jnp.bfloat16
    assert_close(o, want, TOL["bfloat16"], "bf16")


def test_chunk_gradients_match_full():
    q, k, v, g, seg = _draw("s", 2)
    do = np.random.default_rng(3).standard_normal((B, T, H, V)).astype(np.float32)

    def grads(impl):
        loss = lambda *a: jnp.sum(ops.lion(*a, segment_ids=seg, chunk_size=C, impl=impl)[0] * do)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, g)

    for name, a, b in zip("qkvg", grads("chunk"), grads("full"), strict=True):
        assert_close(a, b, TOL["float32"], f"d{name}")


def test_bidirectional_and_bad_arguments():
    q, k, v, g, _ = _draw("s", 4)
    o = _fn("chunk", False)(q, k, v, g, None)
    assert_close(o, lion_reference(q, k, v, g, None, K**-0.5, False), TOL["float32"],
                 "unnormalised")
    v2 = v.copy()
    v2[:, -1] += 1.0
    assert np.abs(np.asarray(_fn("chunk", False)(q, k, v2, g, None) - o)[:, 0]).max() > 0
    with pytest.raises(ValueError, match="impl"):
        ops.lion(q, k, v, impl="pallas")
    with pytest.raises(ValueError, match="g"):
        ops.lion(q, k, v, g[:, :-1])
