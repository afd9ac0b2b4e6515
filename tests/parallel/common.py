"""Shared by the sequence-parallel tests: input draws, packed documents with resets inside shards
and exactly on shard boundaries, and the comparison against the single-device op."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from linear_jax import ops
from linear_jax import parallel as sp
from tests.utils import assert_close

H, K, V, C = 2, 8, 8, 8
TOL = 2e-5  # fp32 with HIGHEST matmuls: the parallel path only re-associates sums

SINGLE = {"linear_attention": ops.linear_attention, "simple_gla": ops.simple_gla,
          "gla": ops.gla, "delta_rule": ops.delta_rule,
          "gated_delta_rule": ops.gated_delta_rule}
GATE = {"simple_gla": "scalar", "gated_delta_rule": "scalar", "gla": "vector"}
DELTA = ("delta_rule", "gated_delta_rule")


def packed_segments(B, T):
    """ids [B, T] whose resets fall on T/2 and T/4 (a shard boundary for P = 2, 4, 8; T/4 is
    inside a shard for P = 2), inside shards (t = 5, 3T/4 + 3) and ids that repeat (A, B, A).
    Row 1 resets only at T/2."""
    seg = np.zeros((B, T), np.int32)
    for t in (5, T // 4, T // 2, 3 * T // 4 + 3):
        seg[0, t:] += 1
    seg[0] %= 2
    if B > 1:
        seg[1:, T // 2:] = 7
    return jnp.asarray(seg)


def draw(op, B, T, *, seed=0, Hk=H, extreme=False, dtype=jnp.float32):
    """Array arguments by name. `extreme`: gates drawn from {0, -30} and beta from {0, 2}."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    x = {"q": f(B, T, Hk, K), "k": f(B, T, Hk, K), "v": f(B, T, H, V)}
    if op in DELTA:
        x["k"] = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True)
        x["beta"] = (2.0 * rng.integers(0, 2, (B, T, H)) if extreme
                     else rng.uniform(0, 2, (B, T, H))).astype(np.float32)
    if op in GATE:
        shape = (B, T, H) if GATE[op] == "scalar" else (B, T, H, K)
        x["g"] = (-30.0 * rng.integers(0, 2, shape) if extreme
                  else -np.logaddexp(0, -rng.uniform(-1, 5, shape))).astype(np.float32)
    out = {n: jnp.asarray(a, dtype if n in ("q", "k", "v") else jnp.float32)
           for n, a in x.items()}
    out["initial_state"] = jnp.asarray(f(B, H, K, V))
    return out


def _loss(fn, x, seg):
    """(a loss of fn's output and final state, (output, final state))."""
    o, S = fn(**x, segment_ids=seg)
    w = jnp.sin(jnp.arange(V, dtype=jnp.float32) + 1.0)
    return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(jnp.cos(S)), (o, S)


@functools.cache
def _single(op, kw_items):
    """jit(x, seg) -> (d loss / d x, (output, final state)) of the single-device op: the reference
    in one compile, shared by the comparisons of an op at one shape (inputs and segment ids are
    arguments)."""
    single = lambda **a: SINGLE[op](**a, impl="chunk", **dict(kw_items))
    return jax.jit(jax.grad(lambda x, seg: _loss(single, x, seg), has_aux=True))


def compare(op, mesh, x, seg, *, tol=TOL, op_kw=None, **sp_kw):
    """Outputs, final state and the gradient of every float input (initial state included) of
    the parallel op on `mesh` (extra arguments `sp_kw`) against the single-device op (`op_kw` go
    to both). The parallel op's outputs are its primal's, run alone (no residuals); the
    reference's come from its gradient's run."""
    base = dict(chunk_size=C, **(op_kw or {}))
    par = lambda **a: getattr(sp, op)(**a, mesh=mesh, **base, **sp_kw)
    g1, (o1, S1) = _single(op, tuple(sorted(base.items())))(x, seg)
    o2, S2 = jax.jit(lambda x: par(**x, segment_ids=seg))(x)
    assert_close(o2, o1, tol, f"{op} output")
    assert_close(S2, S1, tol, f"{op} final state")
    g2 = jax.jit(jax.grad(lambda x: _loss(par, x, seg)[0]))(x)
    for n in x:
        assert_close(g2[n], g1[n], tol, f"{op} d{n}")
