"""The Hopper GLA kernels' numerics on a CPU, in jax's GPU interpreter (`HopperChunkConfig(
interpret=True)`): TMA copies, mbarriers, the warp-specialised walk, the dyadic levels, masks and
span sums run as on the device, each wgmma computed by `jnp.dot` on the same SMEM tiles. Against
the float32 recurrent reference: outputs, final state and every gradient (q, k, v, g, initial
state), with mild and with strong gates (every log decay in [-25, -15]: exp(G) of a chunk is far
below float32's range, so any factor through one reference row would overflow).

T = 100 is two chunks (the second padded); documents start inside the first chunk and at the
second's first row. The default config cuts it into two pieces (two-level walks), "one-level"
walks it whole. "strong-no-docs-K128": two key blocks, each through the gradient kernel's loop
over the levels (the fused kernel, `gla_grad_key_blocks=False`: one CTA walks both; the K = 64
cases take it with one block), at strong decay, with no documents or initial state.
"B2-K128-docs-key-blocks": the shape of the device's gates fault (two batch rows, each with its
own documents: row 1 has one boundary, inside the second chunk), at strong decay, through the
gradient kernel per 64-key block (`gla_grad_key_blocks`, the default: each CTA one key block,
the states in two value blocks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import gla as hopper_gla
from linear_jax.ops import gla

f32 = lambda x: x.astype(jnp.float32)                                       # noqa: E731
# inputs and checks on the host, in numpy: as jax ops, each new shape compiles a few dozen
# one-op programs (random bits, norms), seconds a test
host = lambda x: np.asarray(x, np.float32)                                  # noqa: E731
rel = lambda a, b: float(np.linalg.norm(host(a) - host(b)) / np.linalg.norm(host(b)))  # noqa: E731

# id: (config overrides, gate, documents + initial state, K = V[, B])
CASES = {
    "two-level-docs": ({}, "normal", True, 64),
    "strong-one-level": (dict(pieces=1), "strong", True, 64),
    "strong-no-docs-K128": (dict(gla_grad_key_blocks=False), "strong", False, 128),
    "B2-K128-docs-key-blocks": (dict(gla_grad_key_blocks=True), "strong", True, 128, 2),
}


@functools.cache
def _reference():
    """The float32 recurrent reference's gradients and outputs, jitted once, inputs as arguments
    (the cases of one shape share its compilation)."""
    def loss(args, seg, do, dS):
        q, k, v, g, S0 = (list(args) + [None])[:5]
        o, S = gla(q, k, v, g, scale=q.shape[-1]**-0.5, initial_state=S0, segment_ids=seg,
                   impl="recurrent")
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    return jax.jit(jax.grad(loss, has_aux=True))


@pytest.mark.parametrize("case", list(CASES))
def test_gla_matches_reference(case):
    over, gate, extras, K, *rest = CASES[case]
    cfg = HopperChunkConfig(interpret=True, **over)
    B, T, H, V = (rest or [1])[0], 100, 1, K
    rng = np.random.default_rng(5)                                          # on the host
    normal = lambda *shape: rng.standard_normal(shape, np.float32)          # noqa: E731
    q = normal(B, T, H, K).astype(jnp.bfloat16)
    k = (normal(B, T, H, K) / 8).astype(jnp.bfloat16)
    v = normal(B, T, H, V).astype(jnp.bfloat16)
    if gate == "strong":
        g = (-15.0 - 10.0 * rng.random((B, T, H, K), np.float32)).astype(np.float32)
    else:                                                                   # log_sigmoid
        g = (-np.logaddexp(0.0, -(normal(B, T, H, K) + 2.0)) / 4).astype(np.float32)
    S0 = normal(B, H, K, V) if extras else None
    rows = [(np.arange(T) >= 30) + (np.arange(T) >= 64), np.arange(T) >= 80][:B]
    seg = np.stack(rows).astype(np.int32) if extras else None
    do = normal(B, T, H, V)
    dS = normal(B, H, K, V)
    # on the device: the jitted functions close over seg, do, dS as arrays, not numpy constants
    q, k, v, g, S0, seg, do, dS = jax.device_put((q, k, v, g, S0, seg, do, dS))
    args = [q, k, v, g] + ([S0] if extras else [])
    names = ["dq", "dk", "dv", "dg", "dh0"][:len(args)]

    def loss(fn, *a):
        o, S = fn(*a[:4], a[4] if extras else None)
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    kern = lambda q, k, v, g, S0: hopper_gla.gla(                            # noqa: E731
        q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64, config=cfg)
    argnums = tuple(range(len(args)))
    grads, (o, S) = jax.jit(jax.grad(lambda *a: loss(kern, *a), argnums=argnums,
                                     has_aux=True))(*args)
    grads_r, (o_r, S_r) = _reference()([host(x) for x in args], seg, do, dS)
    assert rel(o, o_r) < 1e-2, rel(o, o_r)
    assert rel(S, S_r) < 1e-2, rel(S, S_r)
    for name, a, b in zip(names, grads, grads_r, strict=True):
        assert not np.isnan(host(a)).any(), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))
