"""The ops contract, run against every op spec and every impl the registry lists for its op.

Cases are (spec, impl) with impl "recurrent", "chunk" and "pallas:<backend>" for each kernel of the
op that runs here (`specs.impls_of`; on a CPU the Triton and TPU kernels in Pallas interpret mode),
so a kernel joins every test below by being registered.

Each test compares with an independent float64 NumPy recurrence (outputs, final state) or with the
`lax.scan` reference (gradients of every float input, initial_state included, through the output
and the final state). Shapes are chosen so T is not a multiple of the chunk size. A state may be a
tuple of arrays (mLSTM's (C, n, m)): it is drawn, compared and reset leaf by leaf, and a reset
zeroes every leaf. `test_strong_gates` repeats the forward and gradient checks with every decay
gate strong (log decays in [-25, -15], or all -20; each spec says what that means for its op).

Both forward forms of an impl are checked against float64: the primal alone (no residuals: a
kernel may take another form there, e.g. the Triton kernels' one-pass forward) in fp32 without
state or segments (`test_no_state_no_segments`, and under strong gates) and in bf16 with both
(`test_bf16_inputs`); the forward under autodiff (which writes the backward's residuals) in fp32
with both, as the outputs of the gradient program (`test_matches_float64_reference`).

Cost: the kernels run in interpret mode, where compiling dominates (and running, for the TPU
kernels). A case builds three programs: the primal in fp32 without state (T = 20, chunk 8) and in
bf16 (T = 38, chunk 16), and the gradients in fp32 that also return the outputs (T = 38). The
jitted functions are cached per (op call, impl, static arguments), shared by specs that draw other
values of the same inputs (delta_rule's beta ranges); the gradient program's results on the
common draw are cached too (`_grad_run`: the float64, gradient and split tests read one run); and
`GROUP_BY` has tests/conftest.py run a case's tests together (pytest-xdist hands a worker
consecutive tests), the split/decode and vmap tests included (parametrized by the case they reuse).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.specs import STRONG, all_specs, impls_of
from tests.utils import TOL, assert_close, segments

SPECS = all_specs()
CASES = [(s, impl) for s in SPECS for impl in impls_of(s)]
ids = lambda c: f"{c[0].name}-{c[1]}"
by_case = pytest.mark.parametrize("case", CASES, ids=ids)
GROUP_BY = "case"
B, T, C = 2, 38, 16   # T: 3 chunks, the last partial; even, so the split test's halves match


def _run(spec, impl, args, kwargs, S0=None, seg=None, chunk_size=C):
    kw = dict(kwargs, impl=impl, initial_state=S0)
    if spec.has_segments:
        kw["segment_ids"] = seg
    if spec.chunked:
        kw["chunk_size"] = chunk_size
    return spec.fn(**args, **kw)


class _Call(NamedTuple):
    """What `_run` reads of a spec: the jitted functions below are cached by it, so specs that
    differ only in the values they draw (delta_rule's two beta ranges) share their compilations."""
    fn: Callable
    has_segments: bool
    chunked: bool


def _call(spec) -> _Call:
    return _Call(spec.fn, spec.has_segments, spec.chunked)


def _forward(spec, impl, kw_items, chunk_size=C):
    """jit of the primal alone (no residuals: a kernel may take another forward form here)."""
    return _jit_forward(_call(spec), impl, kw_items, chunk_size)


@functools.lru_cache(maxsize=16)
def _jit_forward(call, impl, kw_items, chunk_size):
    return jax.jit(lambda args, S0, seg: _run(call, impl, args, dict(kw_items), S0, seg,
                                              chunk_size))


def _grads(spec, impl, kw_items):
    """jit of the gradients of <o, do> + <S, dS> w.r.t. the `diff` inputs and the initial state,
    and of the outputs (o, S) of the forward they differentiate: ((d diff, d S0), (o, S))."""
    return _jit_grads(_call(spec), impl, kw_items)


@functools.lru_cache(maxsize=16)
def _jit_grads(call, impl, kw_items):
    def loss(diff, rest, S0, seg, do, dS):
        o, S = _run(call, impl, {**rest, **diff}, dict(kw_items), S0, seg)
        return jnp.sum(o.astype(jnp.float32) * do) + sum(
            jnp.sum(s * d) for s, d in zip(jax.tree.leaves(S), jax.tree.leaves(dS), strict=True)
        ), (o, S)

    return jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))


@functools.lru_cache(maxsize=4)
def _jit_half(call, kw_items):
    """jit of the chunk form, for the split test's halves (one shape for both)."""
    return jax.jit(lambda a, S, sg: _run(call, "chunk", a, dict(kw_items), S, sg))


@functools.lru_cache(maxsize=4)
def _jit_step(call, kw_items):
    """jit of impl="auto" (T == 1 -> recurrent), for the decode steps."""
    return jax.jit(lambda a, S, sg: _run(call, "auto", a, dict(kw_items), S, sg))


@functools.lru_cache(maxsize=4)
def _jit_vmapped(call, impl, kw_items):
    """jit of the vmap of the output at chunk size 8 (the no-state test's program is the
    unbatched one), for the vmap test."""
    return jax.jit(jax.vmap(lambda a: _run(call, impl, a, dict(kw_items), chunk_size=8)[0]))


@contextlib.contextmanager
def _declined_is_skipped(impl):
    """A kernel may decline inputs it does not support (`Kernel.accepts`: the Hopper kernels take
    bf16/fp16 only), which the registry reports as a ValueError naming the impl: not a failure."""
    try:
        yield
    except ValueError as e:
        if impl.startswith("pallas:") and f"impl={impl!r}: " in str(e):
            pytest.skip(f"{impl} declines these inputs: {e}")
        raise


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
    S0 = (spec.draw_state(rng, args) if spec.draw_state
          else _draw_state(rng, spec.state_shape(args)))
    seg = segments(rng, b, t, p=0.08) if spec.has_segments else None
    return args, kwargs, S0, seg


def _strong_draw(spec, seed, kind, t=T, state=True):
    """`_draw` with every decay gate strong (the gates from their own rng: the same gates whatever
    else is drawn)."""
    args, kwargs, S0, seg = _draw(spec, seed, t=t)
    args = spec.strong(args, np.random.default_rng(seed + 1), kind)
    return (args, kwargs, S0, seg) if state else (args, kwargs, None, None)


@functools.lru_cache(maxsize=16)
def _grad_run(spec, impl, strong=None):
    """The gradient program of `impl` run on the common draw (seed 0, with state and segments; its
    strong-gate version for `strong` in `STRONG`): (args, kwargs, S0, seg, ((d diff, d S0),
    (o, S))). Cached: the float64, gradient and split tests of a case, and the gradient tests of
    every impl of a spec (the recurrent impl's, their reference), read one run."""
    args, kwargs, S0, seg = _draw(spec, 0) if strong is None else _strong_draw(spec, 9, strong)
    rng = np.random.default_rng(4)
    o, S = jax.eval_shape(lambda a: _run(spec, "recurrent", a, kwargs, S0, seg), args)
    do = rng.standard_normal(o.shape).astype(np.float32)
    dS = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), S)
    diff = {n: args[n] for n in spec.diff_args}
    rest = {n: x for n, x in args.items() if n not in diff}
    with _declined_is_skipped(impl):
        out = _grads(spec, impl, tuple(kwargs.items()))(diff, rest, S0, seg, do, dS)
    return args, kwargs, S0, seg, jax.device_get(out)


def _check_outputs(spec, impl, o, S, args, S0, seg, tol, what):
    """Output and final state against the float64 recurrence on the same inputs."""
    ro, rS = spec.reference(_f64(args), None if S0 is None else _state_f64(S0), seg)
    assert o.shape == ro.shape and all(s.dtype == jnp.float32 for s in jax.tree.leaves(S))
    assert_close(o, ro, tol, f"{spec.name}/{impl}{what} output")
    _close(S, rS, tol, f"{spec.name}/{impl}{what} final state")


def _check_forward(spec, impl, strong=None, what=""):
    """The forward under autodiff (the gradient program's outputs) against float64, with an
    initial state and segments."""
    args, _, S0, seg, (_, (o, S)) = _grad_run(spec, impl, strong)
    _check_outputs(spec, impl, o, S, args, S0, seg, TOL["float32"], what)


def _check_primal(spec, impl, args, kwargs, what=""):
    """The primal alone (jitted, no residuals), no state and no segments, T = 20 at chunk 8,
    against float64."""
    with _declined_is_skipped(impl):
        o, S = _forward(spec, impl, tuple(kwargs.items()), chunk_size=8)(args, None, None)
    _check_outputs(spec, impl, o, S, args, None, None, TOL["float32"], what)


def _check_gradients(spec, impl, strong=None, what=""):
    """Gradients of every float input and of initial_state against the recurrent impl's."""
    got = _grad_run(spec, impl, strong)[-1][0]
    want = _grad_run(spec, "recurrent", strong)[-1][0]
    for n in spec.diff_args:
        assert_close(got[0][n], want[0][n], TOL["float32"], f"{spec.name}/{impl}{what} d{n}")
    _close(got[1], want[1], TOL["float32"], f"{spec.name}/{impl}{what} d initial_state")


@by_case
def test_matches_float64_reference(case):
    """With an initial state and segments: the forward that the gradients differentiate (the
    primal alone is checked in fp32 by the next test, with a state and segments in bf16)."""
    spec, impl = case
    _check_forward(spec, impl)


@by_case
def test_no_state_no_segments(case):
    spec, impl = case
    args, kwargs, _, _ = _draw(spec, 1, t=20)
    _check_primal(spec, impl, args, kwargs)


@by_case
def test_bf16_inputs(case):
    spec, impl = case
    args, kwargs, S0, seg = _draw(spec, 2)
    args = {n: (jnp.asarray(x, jnp.bfloat16) if np.asarray(x).dtype == np.float32 else x)
            for n, x in args.items()}
    with _declined_is_skipped(impl):
        o, S = _forward(spec, impl, tuple(kwargs.items()))(args, S0, seg)
    ro, rS = spec.reference(_f64(args), _state_f64(S0), seg)
    assert o.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in jax.tree.leaves(S))
    assert_close(o, ro, TOL["bfloat16"], "output")
    _close(S, rS, TOL["float32"] * 10, "final state")


@pytest.mark.parametrize("case", [c for c in CASES if c[1] != "recurrent"], ids=ids)
def test_gradients_match_reference(case):
    spec, impl = case
    _check_gradients(spec, impl)


# Cases whose strong gates another test checks at least as closely, so not repeated here (each
# runs two interpret-mode TPU calls per kind): tests/kernels/test_tpu_decay.py::
# test_every_gate_strong runs the simple_gla, gla and gated_delta_rule TPU kernels at these shapes
# (fp32, 3 chunks, the last partial, packed documents, an initial state), both kinds, outputs,
# final state and every gradient at 1e-5 (here 2e-4); GLA there with two sub-chunks per chunk
# (here one: the same code less the off-diagonal sub-chunk blocks). The primal alone runs the same
# kernel less the store of the chunks' states (kernels/tpu/_decay.py). ssd's TPU impl is the
# simple_gla kernel after ssd's own gate and value code, which is the same for every impl and
# runs under strong gates in ssd's other cases. selective_scan's TPU kernel runs under strong gates
# in selective_scan[grouped,...]'s case (G = 2 groups: the same code as one group); the plain
# op's dt code (no softplus) is the same for every impl and runs under them in its other cases.
STRONG_ELSEWHERE = {("simple_gla", "pallas:tpu"), ("gla", "pallas:tpu"),
                    ("gated_delta_rule", "pallas:tpu"), ("ssd", "pallas:tpu"),
                    ("selective_scan", "pallas:tpu")}
assert {name for name, _ in STRONG_ELSEWHERE} <= {s.name for s in SPECS}


@pytest.mark.parametrize("kind", STRONG)
@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0].strong and (c[0].name, c[1]) not in STRONG_ELSEWHERE],
    ids=ids)
def test_strong_gates(case, kind):
    """Every decay gate strong: outputs and final state against float64 from both forward forms
    (the primal alone as `test_no_state_no_segments`, the forward under autodiff with a state and
    segments), and (but for the reference itself) the gradient of every float input and of
    initial_state against the recurrent impl, at the fp32 tolerance. Same shapes as the tests
    above, so no new compile."""
    spec, impl = case
    what = f" ({kind} strong gates)"
    args, kwargs, _, _ = _strong_draw(spec, 11, kind, t=20, state=False)
    _check_primal(spec, impl, args, kwargs, what)
    _check_forward(spec, impl, kind, what)
    if impl != "recurrent":
        _check_gradients(spec, impl, kind, what)


@pytest.mark.parametrize("case", [(s, "chunk") for s in SPECS if "chunk" in impls_of(s)], ids=ids)
def test_split_and_step_decode_equal_full(case):
    """Whole sequence == split in two with the state carried == token-by-token decode, through the
    chunk form. The whole sequence is the gradient program's run of the float64 test (same case:
    the jitted functions and that run are shared); the halves have one shape (one compilation for
    both) and each crosses a chunk boundary."""
    spec, impl = case
    cut = T // 2
    args, kwargs, S0, seg, (_, (o, S)) = _grad_run(spec, impl)
    kw = tuple(kwargs.items())
    # jitted: eager dispatch of the chunk forms dominates the suite's time otherwise
    half, step_run = _jit_half(_call(spec), kw), _jit_step(_call(spec), kw)
    timed = lambda x: np.ndim(x) >= 2 and np.shape(x)[1] == T
    head = {n: x[:, :cut] if timed(x) else x for n, x in args.items()}
    tail = {n: x[:, cut:] if timed(x) else x for n, x in args.items()}
    seg_h, seg_t = (None, None) if seg is None else (seg[:, :cut], seg[:, cut:])
    o1, S1 = half(head, S0, seg_h)
    if seg is not None:  # a reset at the cut is a change between cut-1 and cut
        S1 = _reset(S1, seg[:, cut] != seg[:, cut - 1])
    o2, S2 = half(tail, S1, seg_t)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, TOL["float32"], "split output")
    _close(S2, S, TOL["float32"], "split state")
    # decode the first 5 tokens one at a time through impl="auto" (T == 1 -> recurrent)
    St, outs = S0, []
    for i in range(5):
        step = {n: x[:, i:i + 1] if timed(x) else x for n, x in args.items()}
        ot, St = step_run(step, St, None if seg is None else seg[:, i:i + 1])
        outs.append(ot)
        if seg is not None:
            St = _reset(St, seg[:, i + 1] != seg[:, i])
    assert_close(jnp.concatenate(outs, axis=1), o[:, :5], TOL["float32"], "step decode")


@pytest.mark.parametrize(
    "case", [(s, "chunk" if "chunk" in impls_of(s) else impls_of(s)[0]) for s in SPECS], ids=ids)
def test_vmap_over_extra_axis(case):
    """Once per spec, through its chunk form (not per impl: interpret-mode kernels under vmap
    would add minutes to CI for a check of the op's entry). The unbatched run is the no-state
    test's program (same case, same shapes: no compile of its own)."""
    spec, impl = case
    a1, kwargs, _, _ = _draw(spec, 6, t=20)
    a2, _, _, _ = _draw(spec, 7, t=20)
    stacked = {n: np.stack([a1[n], a2[n]]) for n in a1}
    kw = tuple(kwargs.items())
    one = _forward(spec, impl, kw, chunk_size=8)(a2, None, None)[0]
    assert_close(_jit_vmapped(_call(spec), impl, kw)(stacked)[1], one, TOL["float32"], "vmap")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_unknown_impl_raises(spec):
    args, kwargs, _, _ = _draw(spec, 8, t=5)
    with pytest.raises(ValueError, match="impl"):
        _run(spec, "cuda-magic", args, kwargs)
