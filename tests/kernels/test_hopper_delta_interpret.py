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
rel = lambda a, b: float(jnp.linalg.norm(f32(a) - f32(b)) / jnp.linalg.norm(f32(b)))


@functools.cache
def _chunk_form():
    """The float32 chunk form's gradients (of q, k, v, g, beta, S0) and outputs, jitted once for
    both cases (delta_rule as g = 0; op-by-op dispatch costs several times the compilation)."""
    def loss(q, k, v, g, beta, S0, seg, do, dS):
        o, S = gated_delta_rule(q, k, v, g, beta, scale=q.shape[-1]**-0.5, initial_state=S0,
                                segment_ids=seg, impl="chunk")
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))


# (gated, K = V, config overrides): the gradient kernel shares each item between a dq side and a
# dk side; at K = V = 128 two key tiles add their stats and Qd sums two value blocks; in one case
# one program takes all three chunks (the UT prep reuses its output buffers); at K = V = 128 the
# walks run their two value blocks in a CTA each (gated: the reverse walk reads A^T) and in one CTA
# (delta_rule: the reverse walk forms k q^T itself); the UT prep as two CTAs (`prep_two_ctas`),
# the first taking chunks 0 and 2 through its one slot, A, -W, U written over q, k, v and T over
# the inverse's first tile; the default `prep_inverse="blocks"` (the interpreter cannot run its
# per-thread substitution, so the default cases check the kernel's extra tiles and refs, with the
# doubling's blocks) and "doubling"
CASES = {"gated_delta_rule": (True, 64, {}),
         "delta_rule-prep3": (False, 64, {"stages_prep": 3, "programs": 1}),
         "gated_delta_rule-prep_two_ctas": (True, 64, {"prep_two_ctas": True, "stages_prep": 1,
                                                       "prep_inverse": "doubling",
                                                       "programs": 1}),
         "delta_rule-doubling": (False, 64, {"prep_inverse": "doubling", "programs": 1}),
         "gated_delta_rule-K128": (True, 128, {"walk_split": True}),
         "delta_rule-K128": (False, 128, {"walk_split": False})}


def _inputs(T, K, *, seed, starts):
    """(q, k, v, g, beta, S0, seg, do, dS) at B = H = 1, K = V: unit keys, chunk 1 (rows 64-127)
    decaying hard (g down to -20 per step), documents starting at the rows `starts`."""
    B, H, V = 1, 1, K
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, V), jnp.bfloat16)
    t = jnp.arange(T)[None, :, None]
    g = jnp.where((t >= 64) & (t < 128), -20.0 * jax.random.uniform(ks[3], (B, T, H)),
                  jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 4)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    S0 = jax.random.normal(ks[5], (B, H, K, V))
    seg = jnp.asarray(sum(np.arange(T) >= r for r in starts), jnp.int32)[None]
    do = jax.random.normal(ks[6], (B, T, H, V))
    dS = jax.random.normal(ks[7], (B, H, K, V))
    return q, k, v, g, beta, S0, seg, do, dS


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
    grads_r, (o_r, S_r) = _chunk_form()(f32(q), f32(k), f32(v), g if gated else jnp.zeros_like(g),
                                        beta, S0, seg, do, dS)
    grads_r = [grads_r[i] for i in args]
    assert rel(o, o_r) < 1e-2 and rel(S, S_r) < 1e-2, (rel(o, o_r), rel(S, S_r))
    for name, a, b in zip(names, grads, grads_r, strict=True):
        assert not bool(jnp.isnan(f32(a)).any()), name
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
    with the single-level walk's."""
    K, over = PIECES[case]
    q, k, v, g, beta, S0, seg, do, dS = _inputs(250, K, seed=7, starts=(90, 128))
    cfg = dataclasses.replace(CFG, **over)

    def loss(impl, q, k, v, g, beta, S0):
        if impl == "kernel":
            o, S = hopper_delta.delta(q, k, v, g, beta, scale=K**-0.5, initial_state=S0,
                                      segment_ids=seg, chunk_size=64, config=cfg)
        else:
            o, S = gated_delta_rule(q, k, v, g, beta, scale=K**-0.5, initial_state=S0,
                                    segment_ids=seg, impl="chunk")
        return jnp.sum(f32(o) * do) + jnp.sum(S * dS), (o, S)

    backward = case == "P4-K64"

    def run(impl, *a):                         # (grads or None, (o, S)): one run gives both
        fn = functools.partial(loss, impl)
        if backward:
            return jax.jit(jax.grad(fn, argnums=range(6), has_aux=True))(*a)
        return None, jax.jit(fn)(*a)[1]

    grads, (o, S) = run("kernel", q, k, v, g, beta, S0)
    grads_r, (o_r, S_r) = run("chunk", f32(q), f32(k), f32(v), g, beta, S0)
    assert rel(o, o_r) < 1e-2 and rel(S, S_r) < 1e-2, (rel(o, o_r), rel(S, S_r))
    if not backward:
        # the single-level walk is one more interpreted kernel run (seconds): the forward-only
        # case holds the two-level outputs to it; with pieces=4 the chunk form above (outputs and
        # every gradient) is the check
        o1, S1 = jax.jit(lambda: hopper_delta.delta(
            q, k, v, g, beta, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64,
            config=dataclasses.replace(CFG, pieces=1)))()
        assert rel(o, o1) < 3e-3 and rel(S, S1) < 3e-3, (rel(o, o1), rel(S, S1))
    else:
        for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_r,
                              strict=True):
            assert rel(a, b) < 1e-2, (name, rel(a, b))
