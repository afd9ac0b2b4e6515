"""The Hopper selective-scan and mLSTM kernels' numerics on a CPU, in jax's GPU interpreter
(`interpret=True` in their configs): TMA copies, mbarriers, the SMEM widening of the row tiles,
the step algebra and the mLSTM tiles (each wgmma as a float32 `jnp.dot`) run; only the register
layouts are the device's to check (the export tests lower them). Against the float32 recurrent
references on float32 copies of the same bf16 inputs: outputs, final states and the gradients of
every float input, relative to each reference's largest entry (bf16 outputs and a bf16 cotangent
of y: ~1e-2)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from linear_jax.kernels.configs import HopperMlstmConfig, HopperSelectiveConfig
from linear_jax.kernels.gpu.hopper import mlstm as hopper_mlstm
from linear_jax.kernels.gpu.hopper import selective as hopper_selective
from linear_jax.ops.mlstm import mlstm_recurrent
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


TILE = dict(per_thread_forward=False, per_thread_backward=False)
# (B, T, D, N, G, softplus, with segment ids, config)
CASES = [
    # the tile kernels (64 channels a warpgroup, [64, N] accumulator tiles): T, N padded and
    # documents mid-chunk; two groups, no softplus
    (1, 45, 64, 12, 1, True, True, dict(chunk=8, stages=2, **TILE)),
    (1, 29, 128, 16, 2, False, False, dict(chunk=16, stages=3, **TILE)),
    # the per-thread kernels (`selective._Lanes`): both at 32 channels a CTA (four threads a
    # channel, N / 4 states each): documents, softplus, N and T padded (the backward's sub-chunks
    # of 2 steps), two blocks; the backward alone at 64 (two threads a channel, the default) on
    # the tile forward's states (the layout both forwards write): two groups of 64 channels, no
    # softplus, N = 8 (sub-chunks of 8 steps). One thread a channel (thread_channels = 128, no
    # longer the default) passed its device check in session 20 and its exports lower; its
    # interpreter case was dropped for CI's time (its code is the ungrouped branch of `_Lanes`)
    (1, 45, 64, 12, 1, True, True, dict(chunk=8, stages=2, per_thread_forward=True,
                                          per_thread_backward=True, thread_channels=32)),
    (1, 29, 128, 8, 2, False, False, dict(chunk=16, stages=3, per_thread_forward=False,
                                            per_thread_backward=True, thread_channels=64)),
]


@pytest.mark.parametrize("case", CASES, ids=["docs-softplus", "groups", "per-thread-32",
                                             "per-thread-bwd-64-groups"])
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
    (yr, hr), gr = jax.jit(lambda *a: (ref(*a), jax.grad(
        lambda *b: loss(ref, *b), argnums=argnums)(*a)))(*args)
    outs = [("y", yk, yr), ("final state", hk, hr)] + [
        (f"d{n}", a, b) for n, a, b in zip(NAMES, gk, gr, strict=True)]
    for name, a, b in outs:
        a, b = up(a), up(b)
        err = float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))
        assert err < TOL, (name, err)


def _err(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-6))


@functools.cache
def _mlstm_fns(K, states="scan", fused=False, form="tiles"):
    """The kernel's and the reference's values and gradients, jitted once per K: T = 150 (padded
    to two chunks of L = 128, two query tiles each), three packed documents (resets mid-tile and
    mid-chunk), an initial state. K = 128 makes the scale 128^-0.5, no power of two (a q scaled
    in bf16 was rounded there: 4 % gradient error). states: `HopperMlstmConfig.states`; fused:
    `HopperMlstmConfig.fused_forward`."""
    cfg = HopperMlstmConfig(interpret=True, chunk=128, states=states, fused_forward=fused,
                            form=form)
    up = lambda x: x.astype(jnp.float32)                        # noqa: E731

    def kern(q, k, v, i, f, h0, seg):
        return hopper_mlstm.mlstm(q, k, v, i, f, scale=K**-0.5, initial_state=h0,
                                  segment_ids=seg, chunk_size=64, eps=1e-6, config=cfg)

    def ref(q, k, v, i, f, h0, seg):
        return mlstm_recurrent(up(q), up(k), up(v), i, f, scale=K**-0.5, initial_state=h0,
                               segment_ids=seg, eps=1e-6)

    def both(fn):
        def loss(dy, *a):
            y, (C, n, m) = fn(*a)
            return jnp.sum(up(y) * dy) + jnp.sum(C) + jnp.sum(n) + jnp.sum(m)

        return jax.jit(lambda dy, *a: (fn(*a), jax.grad(loss, argnums=tuple(range(1, 7)))(
            dy, *a)))

    return both(kern), both(ref)


# the fused forward at both settings, the second with the chunk states' matmul form in the
# backward (`test_mlstm_states_matmul_matches_scan` holds that form against the scan at 16
# chunks)
@pytest.mark.parametrize("strong,K,states", [
    (False, 128, "simple_gla"), (True, 64, "scan"), (False, 128, "fused"), (True, 64, "matmul")],
    ids=["gates-K128-simple-gla", "strong-forget", "gates-K128-fused",
         "strong-forget-fused-matmul"])
def test_mlstm_matches_reference(strong, K, states):
    """Strong input gates (i ~ 3 N(0, 1)); forget gates as drawn or all strong (log sigmoid(f) =
    -20: the true df is ~1e-5 of dq, so a gate gradient formed as a difference of cumulative sums
    would be rounding only): outputs, final states and the gradients of q, k, v, i, f and the
    initial state (C, n, m) against the recurrent reference."""
    B, T, H, V = 1, 150, 1, K
    ks = jax.random.split(jax.random.PRNGKey(0), 9)
    n = lambda i, *s: jax.random.normal(ks[i], s)              # noqa: E731
    bf = jnp.bfloat16
    q, k, v = n(0, B, T, H, K).astype(bf), n(1, B, T, H, K).astype(bf), n(2, B, T, H, V).astype(bf)
    i, f = 3 * n(3, B, T, H), (jnp.full((B, T, H), -20.0) if strong else n(4, B, T, H) + 2)
    h0 = (n(5, B, H, K, V), jnp.abs(n(6, B, H, K)), n(7, B, H))
    dy = n(8, B, T, H, V).astype(bf).astype(jnp.float32)
    seg = jnp.asarray([[0] * 37 + [1] * 60 + [2] * (T - 97)])
    kern, ref = (_mlstm_fns(K, form="simple_gla") if states == "simple_gla" else
                 _mlstm_fns(K, "matmul" if states == "matmul" else "scan", states != "scan"))
    (y, st), g = kern(dy, q, k, v, i, f, h0, seg)
    (yr, sr), gr = ref(dy, q, k, v, i, f, h0, seg)
    assert _err(y, yr) < TOL
    # the tile kernels form the states in float32 from k; the simple-GLA form's C and n carry
    # the bf16 rounding of its rescaled keys (2^-9 relative: 1.5e-3 here)
    state_tol = TOL if states == "simple_gla" else 1e-5
    for a, b in zip(st, sr, strict=True):
        assert _err(a, b) < state_tol
    names = ("dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0")
    for name, a, b in zip(names, jax.tree.leaves(g), jax.tree.leaves(gr), strict=True):
        assert _err(a, b) < TOL, (name, _err(a, b))


def test_mlstm_fused_matches_unfused_plain():
    """`HopperMlstmConfig.fused_forward` without documents or an initial state (the kernel's
    other branches), T = 200 (four tiles, the last padded), K = 64 against V = 128 (two
    value-block CTAs; the backward's query kernel then stages dq in q's tile, not h's): outputs,
    final states and every gradient against the unfused kernels."""
    B, T, H, K, V = 1, 200, 1, 64, 128
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    n = lambda i, *s: jax.random.normal(ks[i], s)              # noqa: E731
    bf = jnp.bfloat16
    q, k, v = n(0, B, T, H, K).astype(bf), n(1, B, T, H, K).astype(bf), n(2, B, T, H, V).astype(bf)
    i, f = 3 * n(3, B, T, H), n(4, B, T, H) + 2
    dy = n(5, B, T, H, V).astype(bf).astype(jnp.float32)

    def run(fused):
        cfg = HopperMlstmConfig(interpret=True, chunk=128, fused_forward=fused)
        fn = lambda *a: hopper_mlstm.mlstm(*a, scale=K**-0.5, initial_state=None,  # noqa: E731
                                           segment_ids=None, chunk_size=64, eps=1e-6, config=cfg)

        def loss(*a):
            y, (C, nn, m) = fn(*a)
            return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(C) + jnp.sum(nn) + jnp.sum(m)

        return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=tuple(range(5)))(*a)))(
            q, k, v, i, f)

    (y, st), g = run(True)
    (yr, sr), gr = run(False)
    assert _err(y, yr) < TOL
    for a, b in zip(st, sr, strict=True):
        assert _err(a, b) < 1e-5
    for name, a, b in zip(("dq", "dk", "dv", "di", "df"), g, gr, strict=True):
        assert _err(a, b) < TOL, (name, _err(a, b))


def test_mlstm_states_matmul_matches_scan():
    """`HopperMlstmConfig.states`: the chunk states as one product (`mlstm._states_matmul`)
    against the serial scan (`mlstm._states`) over 16 chunks (T = 1000 padded to L = 64), with
    packed documents (a reset in chunk 0, two in one chunk, one at a chunk's first token) and an
    initial state, forget gates as drawn in one sequence and all strong (log sigmoid(f) = -20)
    in the other: the entering and final states and the VJP of every input, float32."""
    B, T, H, K, V, L = 2, 1000, 3, 16, 8, 64
    Tp = -(-T // L) * L
    ks = jax.random.split(jax.random.PRNGKey(1), 8)
    n = lambda i, *s: jax.random.normal(ks[i], s)              # noqa: E731
    k, v = n(0, B, Tp, H, K), n(1, B, Tp, H, V)
    ip = jnp.where(jnp.arange(Tp)[None, :, None] < T, 3 * n(2, B, Tp, H), -1e30)
    lf = jax.nn.log_sigmoid(jnp.concatenate([n(3, 1, Tp, H) + 2, jnp.full((1, Tp, H), -20.0)]))
    h0 = (n(4, B, H, K, V), jnp.abs(n(5, B, H, K)), n(6, B, H))
    starts = jnp.asarray([37, 100, 128, 400, 401, 777])
    seg = jnp.sum(jnp.arange(T)[None, :, None] >= starts + jnp.arange(B)[:, None, None], -1)

    def scan(*a):
        S, m, final = hopper_mlstm._states(*a, seg, T, L)
        return S[..., :-1], S[..., -1], m, final

    def matmul(*a):
        return hopper_mlstm._states_matmul(*a, seg, T, L)

    args = (k, v, ip, lf, h0)
    ya, fa = jax.vjp(jax.jit(scan), *args)              # jitted: op by op it took 20 s
    yb, fb = jax.vjp(jax.jit(matmul), *args)
    ct = jax.tree.map(lambda x: jax.random.normal(ks[7], x.shape), ya)
    for a, b in zip(jax.tree.leaves(ya) + jax.tree.leaves(fa(ct)),
                    jax.tree.leaves(yb) + jax.tree.leaves(fb(ct)), strict=True):
        assert bool(jnp.all(jnp.isfinite(b)))
        assert _err(b, a) < 1e-5, _err(b, a)
