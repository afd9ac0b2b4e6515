"""The Hopper delta-rule kernels' numerics on a CPU, in jax's GPU interpreter
(`HopperDeltaConfig(interpret=True)`): TMA copies, mbarriers, the warp-specialised pipelines (UT
prep, in one case as one program taking every chunk through three slots; the forward walk with
its value blocks in one CTA or a CTA each; the reverse walk, the persistent gradient kernel),
masks, gate algebra and the UT inverse run as on the device; each wgmma is computed by `jnp.dot`
on the same SMEM tiles and bf16 register operands. Against the float32 chunk form on float32
copies.

T = 130: three chunks (the pipelines reuse a slot), the last padded; documents start inside chunk 0
and at chunk 1's first row; an initial state; for the gated rule, chunk 1 decays hard (g down to
-20 per step: no NaN, and the gate gradient stays exact)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import HopperDeltaConfig
from linear_jax.kernels.gpu.hopper import delta as hopper_delta
from linear_jax.ops import gated_delta_rule

CFG = HopperDeltaConfig(interpret=True, programs=2)
f32 = lambda x: x.astype(jnp.float32)
# inputs and checks on the host, in numpy: as jax ops, each new shape compiles a few dozen
# one-op programs (random bits, norms), seconds a test
host = lambda x: np.asarray(x, np.float32)
rel = lambda a, b: float(np.linalg.norm(host(a) - host(b)) / np.linalg.norm(host(b)))


@functools.cache
def _chunk_form():
    """The float32 chunk form's gradients (of q, k, v, g, beta, S0) and outputs, jitted once for
    every case of a shape (delta_rule as g = 0; op-by-op dispatch costs several times the
    compilation)."""
    def loss(q, k, v, g, beta, S0, seg, do, dS):
        o, S = gated_delta_rule(q, k, v, g, beta, scale=q.shape[-1]**-0.5, initial_state=S0,
                                segment_ids=seg, impl="chunk")
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))


# (gated, K = V, config overrides): the gradient kernel shares each item between a dq side and a
# dk side; at K = V = 128 two key tiles add their stats and Qd sums two value blocks; where one
# program takes all three chunks (programs=1) the UT prep reuses its output buffers and the
# gradient kernel its slots, the UT prep its input slot too with two stages (delta_rule-K128) and
# not with three (prep3-doubling); at K = V = 128 the walks run their two value blocks in one CTA
# (delta_rule: the reverse walk forms k q^T itself); the UT prep as two CTAs (`prep_two_ctas`),
# the first taking chunks 0 and 2 through its one slot, A, -W, U written over q, k, v and T over
# the inverse's first tile; the default `prep_inverse="blocks"` (the interpreter cannot run its
# per-thread substitution, so the default cases check the kernel's extra tiles and refs, with the
# doubling's blocks) and "doubling". In test_two_level_walk_matches_chunk_form: the default
# config at K = 64 (gated) as P4-K64 (its UT prep and gradient kernel; pieces aside, the same
# config) with the single-level walks of gated_delta_rule-prep_two_ctas here (no kernel but the UT
# one reads the prep's fields); the gated rule at K = V = 128 with the walks' value blocks in a CTA
# each (the reverse walk reads A^T) as P2-K128-split's single-level run, forward and backward
CASES = {"delta_rule-prep3-doubling": (False, 64, {"stages_prep": 3, "prep_inverse": "doubling",
                                                  "programs": 1}),
         "gated_delta_rule-prep_two_ctas": (True, 64, {"prep_two_ctas": True, "stages_prep": 1,
                                                       "prep_inverse": "doubling",
                                                       "programs": 1}),
         "delta_rule-K128": (False, 128, {"walk_split": False, "programs": 1})}


def _inputs(T, K, *, seed, starts):
    """(q, k, v, g, beta, S0, seg, do, dS) at B = H = 1, K = V: unit keys, chunk 1 (rows 64-127)
    decaying hard (g down to -20 per step), documents starting at the rows `starts`. Drawn on the
    host (numpy), q, k, v in bfloat16, the rest float32 (seg int32)."""
    B, H, V = 1, 1, K
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)      # noqa: E731
    bf16 = lambda x: x.astype(jnp.bfloat16)                              # noqa: E731
    q = bf16(normal(B, T, H, K))
    k = normal(B, T, H, K)
    k = bf16(k / np.linalg.norm(k, axis=-1, keepdims=True))
    v = bf16(normal(B, T, H, V))
    t = np.arange(T)[None, :, None]
    g = np.where((t >= 64) & (t < 128), -20.0 * rng.random((B, T, H), np.float32),
                 -np.logaddexp(0.0, -normal(B, T, H)) / 4).astype(np.float32)   # log_sigmoid
    beta = (1 / (1 + np.exp(-normal(B, T, H)))).astype(np.float32)
    S0 = normal(B, H, K, V)
    seg = np.asarray(sum(np.arange(T) >= r for r in starts), np.int32)[None]
    do = normal(B, T, H, V)
    dS = normal(B, H, K, V)
    # on the device: the jitted functions close over seg, do, dS as arrays, not numpy constants
    return jax.device_put((q, k, v, g, beta, S0, seg, do, dS))


@pytest.mark.parametrize("case", list(CASES))
def test_delta_matches_chunk_form(case):
    gated, K, over = CASES[case]
    q, k, v, g, beta, S0, seg, do, dS = _inputs(130, K, seed=5, starts=(30, 64))

    def loss(fn, *a):
        o, S = fn(*a)
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    kern = lambda q, k, v, g, beta, S0: hopper_delta.delta(
        q, k, v, g if gated else None, beta, scale=K**-0.5, initial_state=S0, segment_ids=seg,
        chunk_size=64, config=dataclasses.replace(CFG, **over))
    args = range(6) if gated else (0, 1, 2, 4, 5)
    names = ("dq", "dk", "dv") + (("dg",) if gated else ()) + ("dbeta", "dh0")
    grads, (o, S) = jax.jit(jax.grad(lambda *a: loss(kern, *a), argnums=args, has_aux=True))(
        q, k, v, g, beta, S0)
    g_r = g if gated else np.zeros(g.shape, np.float32)
    grads_r, (o_r, S_r) = _chunk_form()(host(q), host(k), host(v), g_r, beta, S0, seg, do, dS)
    grads_r = [grads_r[i] for i in args]
    assert rel(o, o_r) < 1e-2 and rel(S, S_r) < 1e-2, (rel(o, o_r), rel(S, S_r))
    for name, a, b in zip(names, grads, grads_r, strict=True):
        assert not np.isnan(host(a)).any(), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))


# (K = V, config overrides) of the two-level walks: four chunks in 4 pieces (backward too) or 2;
# at K = V = 128 the output passes run their two value blocks in a CTA each
PIECES = {"P4-K64": (64, {"pieces": 4}),
          "P2-K128-split": (128, {"pieces": 2, "walk_split": True})}


@pytest.mark.parametrize("case", list(PIECES))
def test_two_level_walk_matches_chunk_form(case):
    """Pieces walked in parallel from the entering states the state pass and the scan give them
    (documents inside pieces and at a piece's first row, an initial state, a hard-decaying chunk)
    agree with the float32 chunk form. In the 4-piece case the backward too: it reads the entering
    state of every chunk that the output pass wrote, and walks back in pieces (the reverse state
    pass, a scan from the last piece, the output pass); there the outputs come from the same run
    as the gradients. In the 2-piece case (forward only) the outputs also agree, more tightly,
    with the single-level walk's, which is run forward and backward and checked as
    test_delta_matches_chunk_form's cases are: the gated rule at K = V = 128 with its walks' value
    blocks in a CTA each (the reverse walk reads A^T), two key tiles adding their stats and Qd
    summing two value blocks in the gradient kernel."""
    K, over = PIECES[case]
    q, k, v, g, beta, S0, seg, do, dS = _inputs(250, K, seed=7, starts=(90, 128))
    cfg = dataclasses.replace(CFG, **over)

    def loss(cfg, q, k, v, g, beta, S0):
        o, S = hopper_delta.delta(q, k, v, g, beta, scale=K**-0.5, initial_state=S0,
                                  segment_ids=seg, chunk_size=64, config=cfg)
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    def run(cfg, *a):                          # (grads, (o, S)): one run gives both
        return jax.jit(jax.grad(functools.partial(loss, cfg), argnums=range(6), has_aux=True))(*a)

    names = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
    grads_r, (o_r, S_r) = _chunk_form()(host(q), host(k), host(v), g, beta, S0, seg, do, dS)
    if case == "P4-K64":
        grads, (o, S) = run(cfg, q, k, v, g, beta, S0)
    else:
        # forward only (the backward in pieces is P4-K64's), held to the chunk form and to the
        # single-level walk, whose run (one more interpreted kernel run, seconds) checks every
        # gradient too
        o, S = jax.jit(lambda *a: loss(cfg, *a)[1])(q, k, v, g, beta, S0)
        grads, (o1, S1) = run(dataclasses.replace(cfg, pieces=1), q, k, v, g, beta, S0)
        assert rel(o, o1) < 3e-3 and rel(S, S1) < 3e-3, (rel(o, o1), rel(S, S1))
        assert rel(o1, o_r) < 1e-2 and rel(S1, S_r) < 1e-2, (rel(o1, o_r), rel(S1, S_r))
    assert rel(o, o_r) < 1e-2 and rel(S, S_r) < 1e-2, (rel(o, o_r), rel(S, S_r))
    for name, a, b in zip(names, grads, grads_r, strict=True):
        assert not np.isnan(host(a)).any(), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))
