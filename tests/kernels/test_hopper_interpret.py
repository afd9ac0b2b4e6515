"""The Hopper kernels' numerics on a CPU, in jax's GPU interpreter (`HopperChunkConfig(interpret=
True)`): TMA copies, mbarriers, the warp-specialised pipeline, masks and gate algebra run as on the
device; each wgmma is computed by `jnp.dot` on the same SMEM tiles (the interpreter of jax 0.10
runs no transposed or register-operand wgmma). Against the float32 chunk form.

T = 100 is two chunks (the second padded) with documents starting inside the first chunk and at
the second's first row: the default config cuts it into two pieces (two-level walk: the second
piece starts a document, so its map has decay 0), the other cases walk it whole. Between them
every variant of HopperChunkConfig is run: pieces (auto / 1), gates ("xla" / "kernel"),
grad_items ("split" / "tile"), with and without gate rows, initial state and documents."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import decay as hopper_decay
from linear_jax.ops import simple_gla

f32 = lambda x: x.astype(jnp.float32)                                       # noqa: E731
rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))  # noqa: E731

# id: (config overrides, gate ("normal" | "strong" | None), documents + initial state)
CASES = {
    "two-level": ({}, "normal", True),
    "kernel-gates": (dict(gates="kernel"), "normal", True),
    "strong-gates": (dict(pieces=1), "strong", True),
    "run1-variant": (dict(pieces=1, gates="xla", grad_items="tile"), "normal", True),
    "kernel-gates-strong": (dict(gates="kernel", pieces=1), "strong", True),
    "no-gate-two-level": ({}, None, False),
}


@functools.cache
def _chunk_form(gated, extras):
    """The float32 chunk form's gradients and outputs, jitted once per input structure and shared
    by the cases (op-by-op dispatch of the chunk form costs several times its compilation)."""
    def loss(args, seg, do, dS):
        a = list(args)
        g = a.pop(3) if gated else None
        S0 = a.pop() if extras else None
        o, S = simple_gla(*a, g, scale=a[0].shape[-1]**-0.5, initial_state=S0, segment_ids=seg,
                          impl="chunk")
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    return jax.jit(jax.grad(loss, has_aux=True))


@pytest.mark.parametrize("case", list(CASES))
def test_simple_gla_matches_chunk_form(case):
    over, gate, extras = CASES[case]
    cfg = HopperChunkConfig(interpret=True, grad_programs=3, **over)
    B, T, H, K, V = 1, 100, 1, 64, 64
    ks = jax.random.split(jax.random.key(3), 7)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    k = (jax.random.normal(ks[1], (B, T, H, K)) / 8).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.bfloat16)
    g = {"strong": -20.0 * jax.random.uniform(ks[3], (B, T, H)),
         "normal": jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 4}.get(gate)
    S0 = jax.random.normal(ks[4], (B, H, K, V)) if extras else None
    seg = (jnp.asarray((np.arange(T) >= 30) + (np.arange(T) >= 64), jnp.int32)[None]
           if extras else None)
    do = jax.random.normal(ks[5], (B, T, H, V))
    dS = jax.random.normal(ks[6], (B, H, K, V))
    args = [x for x in (q, k, v, g, S0) if x is not None]
    names = [n for n, x in zip(("dq", "dk", "dv", "dg", "dh0"), (q, k, v, g, S0), strict=True)
             if x is not None]

    def unpack(a):
        a = list(a)
        return a[:3] + [a.pop(3) if g is not None else None] + [a[-1] if extras else None]

    def loss(fn, *a):
        o, S = fn(*unpack(a))
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    kern = lambda q, k, v, g, S0: hopper_decay.simple_gla(                   # noqa: E731
        q, k, v, g, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64, config=cfg)
    argnums = tuple(range(len(args)))
    grads, (o, S) = jax.jit(jax.grad(lambda *a: loss(kern, *a), argnums=argnums,
                                     has_aux=True))(*args)
    grads_r, (o_r, S_r) = _chunk_form(g is not None, extras)(
        [f32(x) if x.dtype == jnp.bfloat16 else x for x in args], seg, do, dS)
    assert rel(o, o_r) < 1e-2 and rel(S, S_r) < 1e-2
    for name, a, b in zip(names, grads, grads_r, strict=True):
        assert not bool(jnp.isnan(f32(a)).any()), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))


@pytest.mark.parametrize("heads_fastest", [False, True])
@pytest.mark.parametrize("NKB", [None, 2])
def test_grid_items_cover_every_chunk_once(heads_fastest, NKB):
    """The persistent grids' item -> (b, h, n[, kb]) map: a bijection, in the stated order."""
    from linear_jax.kernels.gpu.hopper.common import grid_item

    B, H, N = 2, 3, 5
    n_items = B * H * N * (NKB or 1)
    got = [tuple(int(x) for x in grid_item(jnp.int32(i), H, N, NKB, heads_fastest=heads_fastest))
           for i in range(n_items)]
    assert len(set(got)) == n_items
    assert all(b < B and h < H and n < N for b, h, n, *_ in got)
    if NKB:
        assert [t[3] for t in got[:NKB]] == list(range(NKB))
    step = NKB or 1                                   # the next item after the key blocks
    assert got[step][1:3] == ((1, 0) if heads_fastest else (0, 1))
