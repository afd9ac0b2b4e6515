"""The Hopper (Mosaic GPU) delta-rule kernels on the device: correctness, then timings against the
anchors.

    python -m experiments.benchmarks.hopper_delta_gpu [--quick] [--semantics lane|warpgroup]

(a) Checks: gated_delta_rule and delta_rule (g = None) output, final state and gradients (q, k, v,
    beta, g, initial state) against the float32 XLA chunk form run on float32 copies of the same
    inputs, by relative norm error: keys l2-normalised, beta = sigmoid, packed documents
    (boundaries inside chunks and at chunk starts) with initial states, a strong-decay case (g down
    to -20 per step: no NaN, exact gate gradient), T in {100, 2048} (+ 8192 and padded K, V
    without --quick), K = V in {64, 128}: at B H = 8 the walks run split per value block and in
    pieces (the two-level walks), at the anchor shape (B = 8, H = 16) in one CTA per (b, h); and
    float32 inputs refused (ValueError).
(b) Timings: bf16, H = 16, K = V = 128, B = max(1, 16384 // T), T in {2048, 8192, 32768}: forward
    and forward + backward (grad of sum(o * do) w.r.t. q, k, v, the anchors' protocol; every
    input a jit argument) of both ops, as the median of back-to-back calls (`*_ms`, device time)
    and of calls each blocked on the host (`*_sync_ms`, how the jla anchors were timed), beside
    jla (deltanet, gated_deltanet) timed the same ways in this run where its wheel is installed
    (`jla_run_*`), else its anchors, and the ratio (jla / ours sync, > 1 is faster); and each
    kernel alone (UT prep, forward walk with and without residuals, reverse walk, gradient
    kernel; the UT and gradient kernels also with their work items in the other order; the UT
    kernel also under `PREP_VARIANTS` (one stage, three stages, and `prep_two_ctas`: CTAs of one
    warpgroup and one slot, two to an SM, twice the programs; `prep_inverse="doubling"`: the
    inverse by recursive doubling alone, where the default solves the diagonal blocks by
    substitution on the CUDA cores, then two merge steps), each with the
    relative error of its -W, U, A against the configured kernel's) at the
    first and last T (every T without --quick).
(c) Writes benchmarks/results/hopper_delta_gpu_<device>.json (and a copy under $OUT when set).

A check or timing that fails prints the last 30 lines of its traceback; the script goes on. The
lowering semantics is tried in the order given and the first that compiles is used for the rest.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import anchors as anchor_files
from experiments.benchmarks import common
from experiments.benchmarks import kernel_checks as kc
from experiments.benchmarks.kernel_checks import segments, tail
from linear_jax import ops
from linear_jax.kernels.configs import HopperDeltaConfig, multiprocessors
from linear_jax.kernels.gpu.hopper import delta as hdelta
from linear_jax.kernels.gpu.hopper import delta_bwd as hbwd

TOL = 1e-2
f32 = jnp.float32
# by `gated`: (the op, its name in the jla anchors)
OPS = {True: ("gated_delta_rule", "gated_deltanet"), False: ("delta_rule", "deltanet")}


def l2(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def inputs(B, T, H, K, V, *, gate, dtype, seed, extras):
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    x = {"q": l2(n(B, T, H, K)).astype(dtype), "k": l2(n(B, T, H, K)).astype(dtype),
         "v": n(B, T, H, V).astype(dtype), "beta": jax.nn.sigmoid(n(B, T, H)),
         "do": n(B, T, H, V).astype(dtype), "dS": n(B, H, K, V), "g": None, "S0": None,
         "seg": None}
    if gate == "normal":
        x["g"] = jax.nn.log_sigmoid(n(B, T, H)) / 16
    elif gate == "strong":
        x["g"] = jnp.asarray(-20.0 * rng.uniform(size=(B, T, H)), f32)
    if extras:
        x["S0"] = n(B, H, K, V)
        x["seg"] = segments(B, T, rng)
    return x


def kernel_call(cfg, K):
    def call(x):
        return hdelta.delta(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=K**-0.5,
                            initial_state=x["S0"], segment_ids=x["seg"], chunk_size=64,
                            config=cfg)
    return call


def reference_call(K):
    def call(x):
        kw = dict(scale=K**-0.5, initial_state=x["S0"], segment_ids=x["seg"], impl="chunk")
        if x["g"] is None:
            return ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)
        return ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
    return call


def run_check(name, cfg, B, T, H, K, V, *, gate, extras, seed, peer=None):
    """A check of our kernels under `cfg`, or with `peer` (x -> (o, S): `kc.jla_call`) of that
    call, on the same inputs and against the same reference."""
    x = inputs(B, T, H, K, V, gate=gate, dtype=jnp.bfloat16, seed=seed, extras=extras)
    names = ("q", "k", "v", "beta") + (("g",) if x["g"] is not None else ()) + \
        (("S0",) if x["S0"] is not None else ())
    kern, ref = peer or kernel_call(cfg, K), reference_call(K)
    return kc.check(x, names, (jax.jit(kern), jax.jit(kc.loss_and_grads(kern, names))),
                    jax.jit(kc.loss_and_grads(ref, names)), tol=TOL, check=name, T=T, K=K,
                    V=V, B=B, H=H, gate=gate, extras=extras)


def time_shape(cfg, T, anchors, *, reps, breakdown, profile=False):
    B, H, K, V = max(1, 16384 // T), 16, 128, 128
    x = inputs(B, T, H, K, V, gate="normal", dtype=jnp.bfloat16, seed=T, extras=False)
    q, k, v, do, g = x["q"], x["k"], x["v"], x["do"], x["g"]
    beta = x["beta"].astype(jnp.bfloat16)
    row = {"T": T, "B": B, "H": H, "K": K, "V": V}
    an = anchors.get(T, {})
    for gated in (True, False):
        op, anchor = OPS[gated]
        fwd, fwdbwd = kc.fwd_and_fwdbwd(
            lambda q, k, v, beta, g, gated=gated: hdelta.delta(
                q, k, v, g if gated else None, beta, scale=K**-0.5, initial_state=None,
                segment_ids=None, chunk_size=64, config=cfg)[0])
        peer = kc.jla_peer(anchor, (lambda beta, g: {"g": g, "beta": beta}) if gated else
                           (lambda beta, g: {"beta": beta}))
        kc.time_phases(row, fwd, fwdbwd, (q, k, v, beta, g), do, an, anchor, reps=reps,
                       label=f"T={T} {op}", key=lambda s, op=op: f"{op}.{s}", peer=peer,
                       profile=profile)
    if breakdown:
        row["kernels_ms"] = kernel_breakdown(cfg, dict(x, beta=beta), reps=reps)
    return row


# the UT kernel's configs timed beside the default in the breakdown
PREP_VARIANTS = {"one_stage": dict(stages_prep=1),
                 "three_stages": dict(stages_prep=3, prep_inverse="doubling"),  # SMEM
                 "two_ctas": dict(prep_two_ctas=True, stages_prep=1, prep_inverse="doubling"),
                 "doubling": dict(prep_inverse="doubling")}


def kernel_calls(cfg, x, setup_cfg=None):
    """([(name, jitted fn, args)], intermediates): each kernel of the gated rule alone under `cfg`
    (UT prep without and with T, forward walk without and with residuals, reverse walk, gradient
    kernel), every input a jit argument, those inputs formed beforehand by the same kernels under
    `setup_cfg` (default cfg). x: `inputs` (q, k, v, beta, g, do)."""
    q, k, v, beta, g, do = (x[n] for n in ("q", "k", "v", "beta", "g", "do"))
    B, T, H, K = q.shape
    V, sc = v.shape[-1], K**-0.5
    rows, names = hdelta.delta_rows(g, None, beta, scale=sc, C=cfg.chunk, H=H)
    s0 = hdelta.split_state(jnp.zeros((B, H, 1, K, V), f32), q.dtype)   # one piece's state

    def fns(c):
        prep = lambda res: jax.jit(lambda q, k, v, r: hdelta.prep(          # noqa: E731
            q, k, v, r, names=names, scale=sc, residuals=res, cfg=c))
        walk = lambda res: jax.jit(lambda *a: hdelta.walk(                  # noqa: E731
            *a, names=names, residuals=res, cfg=c))
        rev = jax.jit(lambda *a: hbwd.walk_rev(*a, names=names, scale=sc, cfg=c))
        grad = jax.jit(lambda *a: hbwd.grad(*a, names=names, scale=sc, cfg=c))
        return prep, walk, rev, grad

    prep, walk, rev, grad = fns(setup_cfg or cfg)
    wm, u0, A, tm = prep(True)(q, k, v, rows)
    _, _, _, states, u = walk(True)(q, k, wm, u0, A, rows, s0)
    dbv, _, _, dstates = rev(q, k, do, wm, tm, A, rows, s0)
    prep, walk, rev, grad = fns(cfg)
    calls = [("prep", prep(False), (q, k, v, rows)),
             ("prep_with_T", prep(True), (q, k, v, rows)),
             ("walk", walk(False), (q, k, wm, u0, A, rows, s0)),
             ("walk_residuals", walk(True), (q, k, wm, u0, A, rows, s0)),
             ("walk_rev", rev, (q, k, do, wm, tm, A, rows, s0)),
             ("grad", grad, (q, k, do, u, dbv, rows, states, dstates))]
    mid = dict(rows=rows, names=names, s0=s0, wm=wm, u0=u0, A=A, tm=tm, states=states, u=u,
               dbv=dbv, dstates=dstates)
    return calls, mid


def kernel_breakdown(cfg, x, *, reps):
    """Device ms of each kernel of the gated rule alone (`kernel_calls`), and of its variants."""
    q, k, v, do = x["q"], x["k"], x["v"], x["do"]
    B, T, H, K = q.shape
    V, C = v.shape[-1], cfg.chunk
    kw = dict(cfg=cfg)
    t = lambda f, *a: common.median_ms(f, *a, reps=reps, inner=10)
    out = {}
    try:
        calls, mid = kernel_calls(cfg, x)
        for name, f, args in calls:
            out[name] = t(f, *args)
        names, rows, s0 = mid["names"], mid["rows"], mid["s0"]
        wm, u0, A, tm = mid["wm"], mid["u0"], mid["A"], mid["tm"]
        u, dbv, states, dstates = mid["u"], mid["dbv"], mid["states"], mid["dstates"]
        # the walk's value blocks in the other arrangement (one CTA per (b, h) or per block)
        split = cfg.split_walk(B * H, V // 64, multiprocessors(jax.devices()[0]))
        other = dataclasses.replace(cfg, walk_split=not split)
        out[f"walk_{'joint' if split else 'split'}"] = t(jax.jit(lambda *a: hdelta.walk(
            *a, names=names, residuals=False, cfg=other)), q, k, wm, u0, A, rows, s0)
        # the two-level walk at the configured P (4 where that is 1): the whole of it (state pass,
        # scan, output pass from each piece's entering state) and its state pass alone
        Pc = cfg.pieces_for(B * H, K, V, T // C, multiprocessors(jax.devices()[0]))
        P = Pc if Pc > 1 else 4
        h0 = jnp.zeros((B, H, K, V), f32)
        out[f"walk_two_level_P{P}"] = t(jax.jit(lambda q, k, wm, u0, A, rows, h0: hdelta.two_level(
            q, k, wm, u0, A, rows, h0, names=names, residuals=False, pieces=P, **kw)),
            q, k, wm, u0, A, rows, h0)
        starts = hdelta.split_state(jnp.zeros((B, H, P, K, K + V), f32), q.dtype)
        out[f"walk_state_P{P}"] = t(jax.jit(lambda k, wm, u0, rows, s: hdelta.walk(
            None, k, wm, u0, None, rows, s, names=names, residuals=False, pieces=P,
            emit="state", **kw)), k, wm, u0, rows, starts)
        out[f"walk_rev_{'joint' if split else 'split'}"] = t(jax.jit(lambda *a: hbwd.walk_rev(
            *a, names=names, scale=K**-0.5, cfg=other)), q, k, do, wm, tm, A, rows, s0)
        dS = jnp.zeros((B, H, K, V), f32)
        out[f"walk_rev_two_level_P{P}"] = t(jax.jit(lambda *a: hbwd.two_level_rev(
            *a, names=names, scale=K**-0.5, pieces=P, **kw)), q, k, do, wm, tm, A, rows, dS)
        # the persistent kernels with their items in the other order (chunk or head fastest)
        other = dataclasses.replace(cfg, item_order="chunks" if cfg.item_order == "heads"
                                    else "heads")
        out[f"prep_{other.item_order}"] = t(jax.jit(lambda q, k, v, r: hdelta.prep(
            q, k, v, r, names=names, scale=K**-0.5, residuals=False, cfg=other)), q, k, v, rows)
        out[f"grad_{other.item_order}"] = t(jax.jit(lambda *a: hbwd.grad(
            *a, names=names, scale=K**-0.5, cfg=other)), q, k, do, u, dbv, rows, states,
            dstates)
        # the UT kernel under other configs: its time, and how far its -W, U, A are from this
        # config's on the same inputs (max over the three of the relative norm error)
        for tag, over in PREP_VARIANTS.items():
            other = dataclasses.replace(cfg, **over)
            f = jax.jit(lambda q, k, v, r, other=other: hdelta.prep(
                q, k, v, r, names=names, scale=K**-0.5, residuals=False, cfg=other))
            out[f"prep_{tag}"] = t(f, q, k, v, rows)
            out[f"prep_{tag}_rel_err"] = max(kc.rel(a, b) for a, b in zip(
                f(q, k, v, rows), (wm, u0, A), strict=True))
    except Exception as e:  # noqa: BLE001
        out["error"] = tail(e, 8)
        print(f"kernel breakdown FAILED:\n{tail(e)}")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv=None) -> int:
    a = kc.parser().parse_args(argv)
    dev = jax.devices()[0]
    print("device", dev.device_kind, "jax", jax.__version__, "SMs", getattr(dev, "core_count", "?"))
    t_start = time.perf_counter()
    base = HopperDeltaConfig.default(dev)
    grid = [("gated+docs+h0", 2, 100, 2, 64, 64, "normal", True),
            ("gated+docs+h0", 2, 2048, 4, 128, 128, "normal", True),
            ("delta_rule+docs+h0", 2, 2048, 4, 64, 64, None, True),
            ("delta_rule", 2, 100, 2, 128, 128, None, False),
            ("strong decay+docs+h0", 2, 2048, 4, 128, 128, "strong", True),
            # the anchor shape: one CTA per (b, h) with two value blocks (the walks are split
            # and in pieces at the smaller B H above)
            ("gated+docs+h0, anchor shape", 8, 2048, 16, 128, 128, "normal", True)]
    run = lambda i, c, cfg: run_check(c[0], cfg, *c[1:6], gate=c[6],  # noqa: E731
                                      extras=c[7], seed=100 + i)
    cfg, first = kc.pick_semantics(a.semantics.split(","), base,
                                   lambda cfg: run(0, grid[0], cfg))
    checks, rows, peers = [], [], []
    if cfg is None:
        print("no lowering semantics compiled: nothing else to run")
    else:
        print("config", cfg)
        if not a.quick:
            grid += [("gated+docs+h0", 2, 100, 2, 128, 128, "normal", True),
                     ("gated", 2, 2048, 4, 64, 64, "normal", False),
                     ("delta_rule+docs+h0", 2, 2048, 4, 128, 128, None, True),
                     ("gated+docs+h0", 1, 8192, 4, 128, 128, "normal", True),
                     ("delta_rule+docs+h0", 1, 8192, 4, 64, 64, None, True),
                     ("gated, K=100 V=48 (padded)", 2, 300, 2, 100, 48, "normal", True)]
        # the UT kernel's variants through the whole op (`PREP_VARIANTS` compares their -W, U, A
        # with the default's; these check the op's outputs and gradients): the inverse by
        # doubling alone and two CTAs an SM (aliased)
        prep_grid = [(f"{tag}: {c[0]}",) + c[1:] + (over,) for tag, over in (
            ("prep doubling", dict(prep_inverse="doubling")),
            ("prep two CTAs", dict(prep_two_ctas=True, stages_prep=1,
                                   prep_inverse="doubling"))) for c in (
            ("strong decay+docs+h0", 2, 2048, 4, 128, 128, "strong", True),
            ("delta_rule+docs+h0", 2, 2048, 4, 64, 64, None, True))]
        if not a.skip_checks:
            checks = kc.run_grid(grid, lambda i, c: run(i, c, cfg), done=[first])
            checks += kc.run_grid(prep_grid, lambda i, c: run(
                len(grid) + i, c[:8], dataclasses.replace(cfg, **c[8])))
            # jla's gated_deltanet on the inputs of our checks 1 and 4 (documents, strong decay)
            peers = kc.peer_checks("gated_deltanet", lambda x: {"g": x["g"], "beta": x["beta"]},
                                   grid, (1, 4), run_check)
            # a run cut short in its timings keeps its checks
            common.write_json(common.device_file("hopper_delta_gpu"), rows, checks=checks,
                              partial=True, peer_checks=peers, config=dataclasses.asdict(cfg))
        x = jnp.zeros((1, 64, 1, 64), f32)
        checks.append(kc.float32_refused(lambda: hdelta.delta(
            x, x, x, None, x[..., 0], scale=1.0, initial_state=None, segment_ids=None,
            chunk_size=64)))

        anchor_path, anchors = anchor_files.anchors_for(dev.device_kind)
        print("anchors", anchor_path)
        for T in a.T:
            rows.append(time_shape(cfg, T, anchors, reps=10 if a.quick else a.reps,
                                   breakdown=not a.no_breakdown and (
                                       not a.quick or T in (a.T[0], a.T[-1])),
                                   profile=a.profile))
            print(rows[-1])
            # so far: a run cut short keeps its rows
            common.write_json(common.device_file("hopper_delta_gpu"), rows, checks=checks,
                              partial=True, peer_checks=peers, config=dataclasses.asdict(cfg))
        for op, _ in OPS.values():
            kc.table(rows, op, key=lambda s, op=op: f"{op}.{s}")
    return kc.finish("hopper_delta_gpu", rows, checks, t_start, peer_checks=peers,
                     config=dataclasses.asdict(cfg) if cfg else None, quick=a.quick,
                     tolerance=TOL,
                     shapes="bf16, H=16, K=V=128, B=max(1, 16384 // T); q, k l2-normalised, "
                            "beta = sigmoid, g = log_sigmoid(N(0,1))/16; checks bf16 vs float32 "
                            "chunk form on the same values")

if __name__ == "__main__":
    raise SystemExit(main())
