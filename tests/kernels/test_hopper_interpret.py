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
# inputs and checks on the host, in numpy: as jax ops, each new shape compiles a few dozen
# one-op programs (random bits, norms), seconds a test
host = lambda x: np.asarray(x, np.float32)                                  # noqa: E731
rel = lambda a, b: float(np.linalg.norm(host(a) - host(b)) / np.linalg.norm(host(b)))  # noqa: E731

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
    rng = np.random.default_rng(3)                                          # on the host
    normal = lambda *shape: rng.standard_normal(shape, np.float32)          # noqa: E731
    q = normal(B, T, H, K).astype(jnp.bfloat16)
    k = (normal(B, T, H, K) / 8).astype(jnp.bfloat16)
    v = normal(B, T, H, V).astype(jnp.bfloat16)
    g = {"strong": lambda: (-20.0 * rng.random((B, T, H), np.float32)).astype(np.float32),
         "normal": lambda: (-np.logaddexp(0.0, -normal(B, T, H)) / 4).astype(np.float32),
         None: lambda: None}[gate]()                                        # log_sigmoid / 4
    S0 = normal(B, H, K, V) if extras else None
    seg = (((np.arange(T) >= 30) + (np.arange(T) >= 64)).astype(np.int32)[None]
           if extras else None)
    do = normal(B, T, H, V)
    dS = normal(B, H, K, V)
    # on the device: the jitted functions close over seg, do, dS as arrays, not numpy constants
    q, k, v, g, S0, seg, do, dS = jax.device_put((q, k, v, g, S0, seg, do, dS))
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
    grads_r, (o_r, S_r) = _chunk_form(g is not None, extras)([host(x) for x in args], seg, do,
                                                             dS)
    assert rel(o, o_r) < 1e-2 and rel(S, S_r) < 1e-2
    for name, a, b in zip(names, grads, grads_r, strict=True):
        assert not np.isnan(host(a)).any(), name
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
