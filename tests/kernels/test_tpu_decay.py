"""The TPU kernels (simple_gla, gla, delta_rule, gated_delta_rule) in Pallas TPU interpret mode.

The op contract suite (tests/ops/test_contract.py) runs these kernels as "pallas:tpu" at its
shapes; this file adds what it does not: gradients in bf16 and without documents or initial
state, GLA's sub-chunks, strong gates at 1e-5, the config's checks.

Outputs, final states and the gradients of every float input (q, k, v, g, beta, initial_state)
against the `lax.scan` reference, with packed documents, an initial state, T not a multiple of the
chunk, K != V (neither a lane multiple: the wrapper pads), fp32 and bf16, several sub-chunks per
chunk for GLA and strong decay (every g in [-25, -15] or -20, where a gate gradient formed from
differences of cumulative sums would be rounding noise). delta_rule (no gate) is
gated_delta_rule's kernel with g = 0 (`_decay.run` fills the zeros): the contract's
delta_rule-pallas:tpu cases check that entry. Interpret mode is slow: tiny shapes, one jax.grad
per case that also returns the outputs, and one compilation per op and shape, shared by the tests
of that op (`GROUP_BY` has tests/conftest.py run them together, on one pytest-xdist worker).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import delta_rule as tpu_delta
from linear_jax.kernels.tpu import gla as tpu_gla
from linear_jax.kernels.tpu import simple_gla as tpu_sgla
from linear_jax.ops.delta_rule import delta_rule_recurrent
from linear_jax.ops.gla import gla_recurrent
from linear_jax.ops.simple_gla import simple_gla_recurrent
from tests.utils import TOL, assert_close, l2norm, log_sigmoid_gates, segments

B, H, K, V = 2, 2, 12, 10
GROUP_BY = "op"


@dataclasses.dataclass(frozen=True)
class Op:
    kernel: Callable
    reference: Callable
    gate: Callable | None        # T -> gate shape, or None (no gate)
    beta: bool = False           # delta rule: fn(q, k, v, g, beta, ...), keys l2-normalised


OPS = {
    "simple_gla": Op(tpu_sgla.simple_gla, simple_gla_recurrent, lambda T: (B, T, H)),
    "gla": Op(tpu_gla.gla, gla_recurrent, lambda T: (B, T, H, K)),
    "delta_rule": Op(tpu_delta.delta_rule, delta_rule_recurrent, None, beta=True),
    "gated_delta_rule": Op(tpu_delta.delta_rule, delta_rule_recurrent, lambda T: (B, T, H),
                           beta=True),
}
# (dtype, T, chunk_size, packed documents + initial state, GLA sub-chunk, gate range)
CASES = [
    # GLA, 3 chunks, the last partial, 2 sub-chunks per chunk: the program of its
    # test_every_gate_strong cases (same shapes), here at moderate gates
    ("float32", 37, 16, True, 8, (-4.0, 4.0)),
    # bf16 gradients, with neither documents nor an initial state (one case for both: the docs
    # masks and the initial state are the same code in either dtype, and the fp32 cases here and
    # in the contract run them; the strong decay that the fp32 no-docs case used to draw is
    # test_every_gate_strong's, at 1e-5); 2 chunks, the last partial
    ("bfloat16", 20, 16, False, 16, (-4.0, 4.0)),
]
GATED = ["simple_gla", "gla", "gated_delta_rule"]


def _inputs(op, dtype, T, extras, gate_lo=-4.0, gate_hi=4.0, seed=0, gates=None):
    """Differentiable inputs in call order (q, k, v, [g], [beta]) and S0, seg, do, dS. gates: None
    (log-sigmoid of uniform in [gate_lo, gate_hi]), "uniform" (in [-25, -15]) or "constant"
    (-20)."""
    spec, rng = OPS[op], np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    k = f(B, T, H, K)
    if spec.beta:
        k = jnp.asarray(l2norm(np.asarray(k, np.float32)), dtype)
    args = [f(B, T, H, K), k, f(B, T, H, V)]
    if spec.gate is not None:
        g = {None: lambda: log_sigmoid_gates(rng, spec.gate(T), gate_lo, gate_hi),
             "uniform": lambda: rng.uniform(-25.0, -15.0, spec.gate(T)),
             "constant": lambda: np.full(spec.gate(T), -20.0)}[gates]()
        args.append(jnp.asarray(g, dtype))
    if spec.beta:   # in (0, 2): negative eigenvalues of the transition included
        args.append(jnp.asarray(2 / (1 + np.exp(-rng.standard_normal((B, T, H)))), dtype))
    S0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32) if extras else None
    seg = jnp.asarray(segments(rng, B, T, p=0.08)) if extras else None
    do = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    return args, S0, seg, do, dS


def _loss(op, fn, seg, do, dS, with_s0, **kw):
    spec = OPS[op]

    def loss(*a):
        *a, S0 = a
        a = a[:3] + ([a[3]] if spec.gate is not None else [None]) + a[3 + (spec.gate is not None):]
        o, S = fn(*a, scale=K**-0.5, initial_state=S0 if with_s0 else None, segment_ids=seg, **kw)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)
    return loss


@functools.cache
def _reference(op, argnums, with_s0):
    """jit(grad) of the `lax.scan` reference, every input an argument: the cases of one op at one
    shape (both kinds of strong gates) share its compilation."""
    def loss(seg, do, dS, *a):
        return _loss(op, OPS[op].reference, seg, do, dS, with_s0)(*a)
    return jax.jit(jax.grad(loss, argnums=tuple(n + 3 for n in argnums), has_aux=True))


@functools.cache
def _kernel(op, argnums, with_s0, C, sub):
    """jit(grad) of the kernel, every input an argument (jitted: op-by-op dispatch of the
    kernels' wrappers would cost more): the cases of one op and config at one shape (both kinds
    of strong gates) share its compilation."""
    def loss(seg, do, dS, *a):
        return _loss(op, OPS[op].kernel, seg, do, dS, with_s0, chunk_size=C,
                     config=TpuConfig(sub_chunk=sub))(*a)
    return jax.jit(jax.grad(loss, argnums=tuple(n + 3 for n in argnums), has_aux=True))


def _check(op, args, S0, seg, do, dS, C, sub, tol_o, tol_S, tol_g):
    spec = OPS[op]
    S0_ = jnp.zeros((B, H, K, V), jnp.float32) if S0 is None else S0
    argnums = tuple(range(len(args) + (S0 is not None)))
    got, (o, S) = _kernel(op, argnums, S0 is not None, C, sub)(seg, do, dS, *args, S0_)
    want, (ro, rS) = _reference(op, argnums, S0 is not None)(seg, do, dS, *args, S0_)
    assert o.dtype == args[2].dtype and S.dtype == jnp.float32 and o.shape == ro.shape
    assert_close(o, ro, tol_o, f"{op} output")
    assert_close(S, rS, tol_S, f"{op} final state")
    names = ["dq", "dk", "dv"] + ["dg"] * (spec.gate is not None) + ["dbeta"] * spec.beta
    names += ["d initial_state"] if S0 is not None else []
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, tol_g, f"{op} {name}")


# The fp32 case at the default sub-chunk would be the op contract's (tests/ops/test_contract.py
# runs every "pallas:tpu" kernel at T = 38, C = 16, K = 12, V = 10, fp32, packed documents and an
# initial state: outputs, final state, every gradient at the same tolerance): only GLA, whose case
# here takes two sub-chunks per chunk, runs it here. delta_rule: see the module docstring.
@pytest.mark.parametrize(
    "op,case", [(op, c) for c in CASES for op in GATED if c is not CASES[0] or op == "gla"],
    ids=lambda x: x if isinstance(x, str) else f"{x[0]}-T{x[1]}-C{x[2]}-docs{x[3]}")
def test_matches_recurrent_reference(op, case):
    dtype, T, C, extras, sub, (lo, hi) = case
    args, S0, seg, do, dS = _inputs(op, jnp.dtype(dtype), T, extras, lo, hi)
    if dtype == "float32":
        tols = (TOL["float32"],) * 3
    else:   # against the reference on the same bf16 values; the state is carried in float32
        tols = (TOL["bfloat16"], TOL["float32"] * 10, TOL["bfloat16"])
    _check(op, args, S0, seg, do, dS, C, sub, *tols)


@pytest.mark.parametrize("gates", ["uniform", "constant"])
@pytest.mark.parametrize("op", GATED)
def test_every_gate_strong(op, gates):
    """Every gate strong: dg is ~1e-9 of the other gradients and must match to float32 accuracy
    (the span routing of kernels/tiles.py); with packed documents and an initial state, T = 37 at
    chunk 16 (3 chunks, the last partial), 2 sub-chunks per chunk for GLA: the shapes of the first
    CASES entry, so GLA's compilation is shared with it. The op contract leaves these kernels'
    strong gates to this test (tests/ops/test_contract.py, STRONG_ELSEWHERE)."""
    args, S0, seg, do, dS = _inputs(op, jnp.dtype("float32"), 37, True, gates=gates, seed=3)
    _check(op, args, S0, seg, do, dS, 16, 8, 1e-5, 1e-5, 1e-5)


@pytest.mark.parametrize("bad", [dict(chunk=12), dict(lane=64), dict(sub_chunk=24),
                                 dict(vmem_limit_bytes=0)])
def test_config_rejects_bad_tunables(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TpuConfig(**bad)
