"""The ops contract, run against every op spec and every impl it has.

Each test compares with an independent float64 NumPy recurrence (outputs, final state) or with the
`lax.scan` reference (gradients of every float input, initial_state included, through the output
and the final state). Shapes are chosen so T is not a multiple of the chunk size. A state may be a
tuple of arrays (mLSTM's (C, n, m)): it is drawn, compared and reset leaf by leaf, and a reset
zeroes every leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.specs import all_specs
from tests.utils import TOL, assert_close, segments

SPECS = all_specs()
CASES = [(s, impl) for s in SPECS for impl in s.impls]
ids = lambda c: f"{c[0].name}-{c[1]}"
B, T, C = 2, 37, 16


def _run(spec, impl, args, kwargs, S0=None, seg=None, chunk_size=C):
    kw = dict(kwargs, impl=impl, initial_state=S0)
    if spec.has_segments:
        kw["segment_ids"] = seg
    if spec.chunked:
        kw["chunk_size"] = chunk_size
    return spec.fn(**args, **kw)


def _f64(args):
    """float64 copies of the real float inputs (bf16 included: NumPy does not count it as float)."""
    real_float = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.floating)
    return {n: np.asarray(x).astype(np.float64) if real_float(x) else np.asarray(x)
            for n, x in args.items()}


def _draw_state(rng, shape):
    """A float32 state of `shape`, or a tuple of them when `shape` is a tuple of shapes."""
    if all(isinstance(d, (int, np.integer)) for d in shape):
        return rng.standard_normal(shape).astype(np.float32)
    return tuple(_draw_state(rng, s) for s in shape)


def _state_f64(S):
    return jax.tree.map(lambda s: np.asarray(s, np.float64), S)


def _close(a, b, tol, what):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), f"{what}: {len(la)} state arrays, expected {len(lb)}"
    for n, (x, y) in enumerate(zip(la, lb, strict=True)):
        assert_close(x, y, tol, what if len(la) == 1 else f"{what}[{n}]")


def _reset(S, r):
    """Zeroes the state of the batch rows where `r` [B] is True."""
    r = jnp.asarray(r)
    return jax.tree.map(lambda s: jnp.where(r.reshape((-1,) + (1,) * (s.ndim - 1)), 0.0, s), S)


def _draw(spec, seed, dtype=np.float32, b=B, t=T):
    rng = np.random.default_rng(seed)
    args, kwargs = spec.make(rng, b, t, dtype)
    S0 = _draw_state(rng, spec.state_shape(args))
    seg = segments(rng, b, t, p=0.08) if spec.has_segments else None
    return args, kwargs, S0, seg


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_matches_float64_reference(case):
    spec, impl = case
    args, kwargs, S0, seg = _draw(spec, 0)
    o, S = jax.jit(lambda a: _run(spec, impl, a, kwargs, S0, seg))(args)
    ro, rS = spec.reference(_f64(args), _state_f64(S0), seg)
    assert o.shape == ro.shape and all(s.dtype == jnp.float32 for s in jax.tree.leaves(S))
    assert_close(o, ro, TOL["float32"], f"{spec.name}/{impl} output")
    _close(S, rS, TOL["float32"], f"{spec.name}/{impl} final state")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_no_state_no_segments(case):
    spec, impl = case
    args, kwargs, _, _ = _draw(spec, 1, t=20)
    o, S = _run(spec, impl, args, kwargs, chunk_size=8)
    ro, rS = spec.reference(_f64(args), None, None)
    assert_close(o, ro, TOL["float32"], "output")
    _close(S, rS, TOL["float32"], "final state")


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_bf16_inputs(case):
    spec, impl = case
    args, kwargs, S0, seg = _draw(spec, 2)
    args = {n: (jnp.asarray(x, jnp.bfloat16) if np.asarray(x).dtype == np.float32 else x)
            for n, x in args.items()}
    o, S = _run(spec, impl, args, kwargs, S0, seg)
    ro, rS = spec.reference(_f64(args), _state_f64(S0), seg)
    assert o.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in jax.tree.leaves(S))
    assert_close(o, ro, TOL["bfloat16"], "output")
    _close(S, rS, TOL["float32"] * 10, "final state")


@pytest.mark.parametrize("case", [c for c in CASES if c[1] != "recurrent"], ids=ids)
def test_gradients_match_reference(case):
    spec, impl = case
    args, kwargs, S0, seg = _draw(spec, 3)
    rng = np.random.default_rng(4)
    names = spec.diff_args

    def loss(impl_, diff, S0_):
        full = dict(args, **diff)
        o, S = _run(spec, impl_, full, kwargs, S0_, seg)
        do = jnp.asarray(rng_do, jnp.float32)
        dS = jax.tree.map(lambda d: jnp.asarray(d, jnp.float32), rng_dS)
        return jnp.sum(o.astype(jnp.float32) * do) + sum(
            jnp.sum(s * d) for s, d in zip(jax.tree.leaves(S), jax.tree.leaves(dS), strict=True))

    o, S = _run(spec, "recurrent", args, kwargs, S0, seg)
    rng_do = rng.standard_normal(o.shape)
    rng_dS = jax.tree.map(lambda s: rng.standard_normal(s.shape), S)
    diff = {n: args[n] for n in names}
    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    got, want = grad(impl, diff, S0), grad("recurrent", diff, S0)
    for n in names:
        assert_close(got[0][n], want[0][n], TOL["float32"], f"d{n}")
    _close(got[1], want[1], TOL["float32"], "d initial_state")


@pytest.mark.parametrize("spec", [s for s in SPECS if "chunk" in s.impls], ids=lambda s: s.name)
def test_split_and_step_decode_equal_full(spec):
    """Whole sequence == random split with the state carried == token-by-token decode."""
    args, kwargs, S0, seg = _draw(spec, 5, t=29)
    # jitted: eager dispatch of the chunk forms dominates the suite's time otherwise
    run = jax.jit(lambda impl, a, S, sg: _run(spec, impl, a, kwargs, S, sg), static_argnums=0)
    o, S = run("chunk", args, S0, seg)
    cut = 11
    timed = lambda x: np.ndim(x) >= 2 and np.shape(x)[1] == 29
    head = {n: x[:, :cut] if timed(x) else x for n, x in args.items()}
    tail = {n: x[:, cut:] if timed(x) else x for n, x in args.items()}
    seg_h, seg_t = (None, None) if seg is None else (seg[:, :cut], seg[:, cut:])
    o1, S1 = run("chunk", head, S0, seg_h)
    if seg is not None:  # a reset at the cut is a change between cut-1 and cut
        S1 = _reset(S1, seg[:, cut] != seg[:, cut - 1])
    o2, S2 = run("chunk", tail, S1, seg_t)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, TOL["float32"], "split output")
    _close(S2, S, TOL["float32"], "split state")
    # decode the first 5 tokens one at a time through impl="auto" (T == 1 -> recurrent)
    St, outs = S0, []
    for t in range(5):
        step = {n: x[:, t:t + 1] if timed(x) else x for n, x in args.items()}
        ot, St = run("auto", step, St, None if seg is None else seg[:, t:t + 1])
        outs.append(ot)
        if seg is not None and t + 1 < 29:
            St = _reset(St, seg[:, t + 1] != seg[:, t])
    assert_close(jnp.concatenate(outs, axis=1), o[:, :5], TOL["float32"], "step decode")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_vmap_over_extra_axis(spec):
    a1, kwargs, _, _ = _draw(spec, 6, t=9)
    a2, _, _, _ = _draw(spec, 7, t=9)
    stacked = {n: np.stack([a1[n], a2[n]]) for n in a1}
    impl = "chunk" if "chunk" in spec.impls else spec.impls[0]
    one = lambda a: _run(spec, impl, a, kwargs, chunk_size=4)[0]
    o = jax.jit(jax.vmap(one))(stacked)
    assert_close(o[1], jax.jit(one)(a2), TOL["float32"], "vmap")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_unknown_impl_raises(spec):
    args, kwargs, _, _ = _draw(spec, 8, t=5)
    with pytest.raises(ValueError, match="impl"):
        _run(spec, "cuda-magic", args, kwargs)
