"""The Hopper selective-scan kernels' numerics on a CPU, in jax's GPU interpreter
(`HopperSelectiveConfig(interpret=True)`): TMA copies, mbarriers, the SMEM widening of the row
tiles and the whole step algebra run; only the register layouts are the device's to check
(the export tests lower them). Against the float32 recurrent reference on float32 copies of the
same bf16 inputs: the output, final state and gradients of every float input, relative to each
reference's largest entry (bf16 outputs and a bf16 cotangent of y: ~1e-2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from linear_jax.kernels.configs import HopperSelectiveConfig
from linear_jax.kernels.gpu.hopper import selective as hopper_selective
from linear_jax.ops.selective_scan import selective_scan

TOL = 2e-2
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")


def _inputs(B, T, D, N, G, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    n = lambda i, *s: jax.random.normal(ks[i], s)              # noqa: E731
    bf = jnp.bfloat16
    return (n(0, B, T, D).astype(bf), (n(1, B, T, D) - 1).astype(bf), -jnp.exp(n(2, D, N)),
            n(3, B, T, G, N), n(4, B, T, G, N), n(5, D), n(6, B, T, D).astype(bf),
            0.5 * n(7, D), n(8, B, D, N))


# (B, T, D, N, G, softplus, with segment ids, config)
CASES = [
    (1, 40, 64, 12, 1, True, True, dict(chunk=8, stages=2)),   # T, N padded; docs mid-chunk
    (1, 32, 128, 16, 2, False, False, dict(chunk=16, stages=3)),  # two groups, no softplus
]


@pytest.mark.parametrize("case", CASES, ids=["docs-softplus", "groups"])
def test_selective_matches_reference(case):
    B, T, D, N, G, softplus, docs, over = case
    cfg = HopperSelectiveConfig(interpret=True, **over)
    args = _inputs(B, T, D, N, G)
    if not softplus:                      # dt = delta + bias must stay positive: decays <= 1
        args = (args[0], jnp.abs(args[1]), *args[2:7], jnp.abs(args[7]), args[8])
    seg = jnp.asarray([[0] * 13 + [1] * 20 + [2] * (T - 33)]) if docs else None
    up = lambda x: x.astype(jnp.float32)                        # noqa: E731

    def kern(u, dl, A, Bm, Cm, Dv, z, bias, h0):
        return hopper_selective.selective_scan(u, dl, A, Bm, Cm, Dv, z, bias, softplus,
                                               initial_state=h0, segment_ids=seg,
                                               chunk_size=64, config=cfg)

    def ref(u, dl, A, Bm, Cm, Dv, z, bias, h0):
        return selective_scan(up(u), up(dl), A, Bm, Cm, Dv, up(z), bias, softplus,
                              initial_state=h0, segment_ids=seg, impl="recurrent")

    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    dy = jax.random.normal(ks[0], (B, T, D)).astype(jnp.bfloat16).astype(jnp.float32)
    dh = jax.random.normal(ks[1], (B, D, N))

    def loss(fn, *a):
        y, h = fn(*a)
        return jnp.sum(up(y) * dy) + jnp.sum(h * dh)

    argnums = tuple(range(len(NAMES)))
    (yk, hk), gk = jax.jit(lambda *a: (kern(*a), jax.grad(
        lambda *b: loss(kern, *b), argnums=argnums)(*a)))(*args)
    yr, hr = ref(*args)
    gr = jax.grad(lambda *b: loss(ref, *b), argnums=argnums)(*args)
    outs = [("y", yk, yr), ("final state", hk, hr)] + [
        (f"d{n}", a, b) for n, a, b in zip(NAMES, gk, gr, strict=True)]
    for name, a, b in outs:
        a, b = up(a), up(b)
        err = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))
        assert err < TOL, (name, err)
