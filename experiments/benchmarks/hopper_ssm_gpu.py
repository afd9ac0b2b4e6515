"""The Hopper (Mosaic GPU) kernels of the selective scan (Mamba-1) and of mLSTM on the device:
correctness, then timings beside jax-linear-attention's (jla: timed in the same run where its
package imports, else the H200 anchors' `scans`) and our Triton kernels.

    python -m experiments.benchmarks.hopper_ssm_gpu --quick [--semantics lane|warpgroup]
        [--ops selective,mlstm] [--variants default,exact] [--ml-variants default,approx]

(a) Checks: each Hopper kernel's outputs, final state and the gradients of every float input
    (selective: u, delta, A, B, C, D, z, delta_bias, initial state; mlstm: q, k, v, i, f and the
    initial state's C, n, m; its backward is the Mosaic GPU kernels') against the float32
    reference (`impl="recurrent"` on float32 copies of the same bf16 values), by relative norm
    error (TOL), with an initial state and packed documents; mlstm also with every forget gate
    strong (log sigmoid(f) = -20, where a gate gradient formed as a difference of cumulative sums
    is rounding only); float32 inputs refused (ValueError). `--quick`: one small grid per op
    (T = 1000 and 2048), else also larger D / T.
(b) Timings, bf16, every input a jit argument: selective B=4 T=4096 D=2048 N=16 (D skip, z
    gate, softplus step with bias: the jla anchor's setting), mlstm B=8 T=2048 and B=2 T=8192,
    H=16 K=V=128: forward and forward + backward (grad of sum(y * dy) w.r.t. every float input),
    device time (10 back-to-back calls) and `sync` (each call blocked on the host, as the anchors
    were timed), for impl "pallas:mosaic_gpu" (each variant) and "pallas:triton", beside jla's
    Mosaic GPU mamba1 / mlstm timed the same way in the same process (row "jla_run"; the H200
    anchors' numbers stay under "jla") and the ratio of jla's sync ms to ours (> 1: ours is
    faster; against jla_run where it ran); mlstm also the backward alone (`bwd`: the VJP of a
    forward run once, its residuals as arguments).
    Every variant named for timing is checked first (skipped with --skip-checks).
(c) benchmarks/results/hopper_ssm_gpu_<device>.json, written after the checks and after each
    timing (a run cut short keeps what it had).

A kernel that fails to compile or run prints the last lines of its traceback and the rest goes
on. The first lowering semantics in --semantics that passes the selective check is used after.
Expected wall time with --quick on an H200: ~3 minutes, mostly compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import anchors as anchor_files
from experiments.benchmarks import common, profile
from experiments.benchmarks.kernel_checks import rel, tail
from linear_jax import ops
from linear_jax.kernels.configs import HopperSelectiveConfig

TOL = 2e-2
f32 = jnp.float32
VARIANTS = {"default": {}, "exact": dict(approx_math=False), "chunk8": dict(chunk=8),
            "stages2": dict(stages=2), "threads": dict(per_thread_forward=True),
            "tbwd": dict(per_thread_forward=True, per_thread_backward=True),
            "tbwd64": dict(per_thread_forward=True, per_thread_backward=True, thread_channels=64),
            "threads64": dict(per_thread_forward=True, thread_channels=64),
            "tbwd32": dict(per_thread_forward=True, per_thread_backward=True, thread_channels=32),
            "tbwd32_ch32": dict(per_thread_forward=True, per_thread_backward=True,
                                thread_channels=32, chunk=32)}
ML_VARIANTS = {"default": {}, "approx": dict(approx_math=True),
               "states_matmul": dict(states="matmul"),
               "states_matmul_c64": dict(states="matmul", chunk=64),   # ~98 KB SMEM: 2 CTAs / SM
               "fused": dict(fused_forward=True),   # one walk kernel: no state pass in the fwd
               "fused_matmul": dict(fused_forward=True, states="matmul"),
               "simple_gla": dict(form="simple_gla")}   # the simple-GLA kernels, XLA normaliser
SEL_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")
SEL_SHAPE = (4, 4096, 2048, 16, 1)        # B, T, D, N, G of the timing (the jla anchor's)
ML_SHAPES = ((8, 2048), (2, 8192))        # B, T of the mLSTM timings (H = 16, K = V = 128)
ML_HKV = (16, 128, 128)


def segments(B, T, rng):
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        for c in {int(rng.integers(1, T)), 16 * int(rng.integers(1, T // 16))}:
            ids[b, c:] += 1
    return jnp.asarray(ids)


# -- selective scan -------------------------------------------------------------------------------
def sel_inputs(B, T, D, N, G, *, seed=0, extras=True):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)     # noqa: E731
    bf = jnp.bfloat16
    x = dict(u=jnp.asarray(n(B, T, D), bf), delta=jnp.asarray(n(B, T, D) - 1.0, bf),
             A=-jnp.exp(jnp.asarray(n(D, N))), B=jnp.asarray(n(B, T, G, N)),
             C=jnp.asarray(n(B, T, G, N)), D=jnp.asarray(n(D)), z=jnp.asarray(n(B, T, D), bf),
             delta_bias=jnp.asarray(0.5 * n(D)), h0=jnp.asarray(n(B, D, N)) if extras else None,
             dy=jnp.asarray(n(B, T, D), bf), dh=jnp.asarray(n(B, D, N)))
    x["seg"] = segments(B, T, rng) if extras else None
    return x


def sel_fns(impl, cfg, seg):
    """(forward, gradient of every float input) through `ops.selective_scan`, or through jla's
    Mosaic GPU mamba1 (impl "jla": C, B, u as its q, k, v)."""
    def f(u, delta, A, B, C, D, z, bias, h0):
        if impl == "jla":
            from jla.ops.mosaic_gpu.mamba1 import mamba1
            # its kernel takes B, C as [B, T, N] (one group) only
            return mamba1(C[:, :, 0], B[:, :, 0], u, delta, A, d=D, z=z, dt_bias=bias,
                          dt_softplus=True, initial_state=h0, segment_ids=seg,
                          output_final_state=True)
        return ops.selective_scan(u, delta, A, B, C, D, z, bias, True, initial_state=h0,
                                  segment_ids=seg, impl=impl, config=cfg)

    def loss(*a):
        *xs, dy, dh = a
        y, h = f(*xs)
        return jnp.sum(y.astype(f32) * dy.astype(f32)) + jnp.sum(h * dh)

    return f, jax.grad(loss, argnums=tuple(range(len(SEL_NAMES))))


def sel_check(cfg, B, T, D, N, G):
    x = sel_inputs(B, T, D, N, G)
    args = [x[k] for k in SEL_NAMES]
    f, g = sel_fns("pallas:mosaic_gpu", cfg, x["seg"])
    fr, gr = sel_fns("recurrent", None, x["seg"])
    up = [a.astype(f32) for a in args]
    y, h = jax.jit(f)(*args)
    yr, hr = jax.jit(fr)(*up)
    out = {"y": rel(y, yr), "final_state": rel(h, hr)}
    dk = jax.jit(g)(*args, x["dy"], x["dh"])
    dr = jax.jit(gr)(*up, x["dy"].astype(f32), x["dh"])
    out.update({f"d{n}": rel(a, b) for n, a, b in zip(SEL_NAMES, dk, dr, strict=True)})
    try:
        f(*up)
        out["float32_refused"] = False
    except ValueError:
        out["float32_refused"] = True
    return out


def sel_setup(impl, cfg, batch):
    """(f, jitted forward, jitted fwd+bwd, their args) at the timing shape with `batch`."""
    x = sel_inputs(batch, *SEL_SHAPE[1:], extras=False)
    args = [x[k] for k in SEL_NAMES[:-1]] + [None]
    f, g = sel_fns(impl, cfg, None)
    fj = jax.jit(lambda *a: f(*a, None))
    gj = jax.jit(lambda *a: g(*a[:8], None, *a[8:])[:8])
    return f, fj, gj, args[:8], args[:8] + [x["dy"], x["dh"]]


def sel_timing(impl, cfg, reps, batch=SEL_SHAPE[0], prof=False, mem=False):
    f, fj, gj, a, ab = sel_setup(impl, cfg, batch)
    row = timed(fj, a, gj, ab, reps, prof, mem)

    def chained(*a):                      # 4 forwards in one executable, each on the last's y
        y = a[0]
        for _ in range(4):
            y = f(y, *a[1:], None)[0]
        return y

    # Device time of one forward with one dispatch per 4: 4 x fwd_ms if the device is the bound,
    # about fwd_ms if each call's host dispatch is (NOTES_ssm.md, session 18).
    cj = jax.jit(chained)
    jax.block_until_ready(cj(*a))
    row["fwd_x4_ms"] = round(common.median_ms(cj, *a, reps=reps, inner=10), 4)
    return row


# -- mLSTM ----------------------------------------------------------------------------------------
def ml_inputs(B, T, H, K, V, *, seed=0, extras=True):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)     # noqa: E731
    bf = jnp.bfloat16
    x = dict(q=jnp.asarray(n(B, T, H, K), bf), k=jnp.asarray(n(B, T, H, K), bf),
             v=jnp.asarray(n(B, T, H, V), bf), i=jnp.asarray(n(B, T, H)),
             f=jnp.asarray(n(B, T, H) + 3.0), dy=jnp.asarray(n(B, T, H, V), bf))
    x["state"] = ((jnp.asarray(n(B, H, K, V)), jnp.asarray(np.abs(n(B, H, K))),
                   jnp.asarray(n(B, H))) if extras else None)
    x["seg"] = segments(B, T, rng) if extras else None
    return x


def ml_fns(impl, cfg, seg):
    """As `sel_fns` for `ops.mlstm` (impl "jla": jla's Mosaic GPU mlstm, whose g is the log
    forget gate, log sigmoid(f); its state (C, n, m) as ours)."""
    def f(q, k, v, i, fg, state):
        if impl == "jla":
            from jla.ops.mosaic_gpu.mlstm import mlstm
            y, st = mlstm(q, k, v, jax.nn.log_sigmoid(fg.astype(f32)), i, initial_state=state,
                          segment_ids=seg, output_final_state=True)
            return y, tuple(st)
        return ops.mlstm(q, k, v, i, fg, initial_state=state, segment_ids=seg, impl=impl,
                         config=cfg)

    def loss(q, k, v, i, fg, state, dy):
        y, (C, n, m) = f(q, k, v, i, fg, state)
        return jnp.sum(y.astype(f32) * dy.astype(f32)) + jnp.sum(C) + jnp.sum(n) + jnp.sum(m)

    return f, jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def ml_check(cfg, B, T, H, K, V, extras):
    """Relative errors of the kernel against the recurrence; with `extras` (an initial state,
    packed documents) also every forget gate strong (`strong_*`), on the same compiled calls."""
    x = ml_inputs(B, T, H, K, V, extras=extras)
    f, g = (jax.jit(fn) for fn in ml_fns("pallas:mosaic_gpu", cfg, x["seg"]))
    fr, gr = (jax.jit(fn) for fn in ml_fns("recurrent", None, x["seg"]))

    def compare(x):
        args = [x[k] for k in ("q", "k", "v", "i", "f", "state")]
        up = [jax.tree.map(lambda a: a.astype(f32), a) for a in args]
        (y, st), (yr, sr) = f(*args), fr(*up)
        out = {"y": rel(y, yr)}
        out.update({f"state_{n}": rel(a, b) for n, a, b in zip("Cnm", st, sr, strict=True)})
        dk, dr = g(*args, x["dy"]), gr(*up, x["dy"].astype(f32))
        for n, a, b in zip(("q", "k", "v", "i", "f"), dk[:5], dr[:5], strict=True):
            out[f"d{n}"] = rel(a, b)
        if args[-1] is not None:
            out.update({f"dstate_{m}": rel(p, r) for m, p, r in zip("Cnm", dk[-1], dr[-1],
                                                                    strict=True)})
        return out

    out = compare(x)
    if extras:                                      # log sigmoid(f) = -20 on every step
        strong = compare(dict(x, f=jnp.full_like(x["f"], -20.0)))
        out.update({f"strong_{k}": v for k, v in strong.items()})
    return out


def ml_setup(impl, cfg, B, T):
    """(inputs, jitted forward, jitted fwd+bwd, their args) at B, T."""
    x = ml_inputs(B, T, *ML_HKV, extras=False)
    f, g = ml_fns(impl, cfg, None)
    a = [x[k] for k in ("q", "k", "v", "i", "f")]
    fj = jax.jit(lambda *a: f(*a, None))
    gj = jax.jit(lambda *a: g(*a[:5], None, a[5])[:5])
    return x, fj, gj, a, a + [x["dy"]]


def ml_timing(impl, cfg, B, T, reps, prof=False, mem=False):
    x, fj, gj, a, ab = ml_setup(impl, cfg, B, T)
    row = timed(fj, a, gj, ab, reps, prof, mem)
    _, vjp = jax.vjp(fj, *a)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fj, *a)[1])
    args = (vjp, (x["dy"], zero))
    bj = jax.jit(lambda vjp, cts: vjp(cts))
    jax.block_until_ready(bj(*args))
    row["bwd_ms"] = round(common.median_ms(bj, *args, reps=reps, inner=10), 4)
    return row


# -- driver ---------------------------------------------------------------------------------------
def mem_bytes(fn, args) -> int | None:
    """The compiled executable's arguments + outputs + temporaries: its peak device memory as
    XLA plans it (None where the backend gives no analysis)."""
    m = fn.lower(*args).compile().memory_analysis()
    return None if m is None else int(m.argument_size_in_bytes + m.output_size_in_bytes
                                      + m.temp_size_in_bytes)


def timed(fj, a, gj, ab, reps, prof=False, mem=False):
    """fwd / fwdbwd compile s, device ms (10 calls back to back) and sync ms; with `prof` the
    mean us a call of every kernel the fwdbwd ran (a profiler trace), largest first; with `mem`
    the fwdbwd's planned peak bytes (`mem_bytes`)."""
    row = {}
    if mem:
        row["fwdbwd_mem_bytes"] = mem_bytes(gj, ab)
    for key, fn, args in (("fwd", fj, a), ("fwdbwd", gj, ab)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        row[f"{key}_compile_s"] = round(time.perf_counter() - t0, 2)
        row[f"{key}_ms"] = round(common.median_ms(fn, *args, reps=reps, inner=10), 4)
        row[f"{key}_sync_ms"] = round(common.median_ms(fn, *args, reps=reps), 4)
    if prof:
        us = profile.kernel_times(lambda x: gj(*x), ab)
        print("  fwdbwd kernels:\n" + profile.format_times(us, top=16), flush=True)
        row["fwdbwd_kernels_us"] = {k[:120]: round(v, 1) for k, v in us.items()}
        slow = [k for k in us if "mosaic" not in k and "triton" not in k][:8]
        print(profile.fusion_text(gj.lower(*ab).compile().as_text(), slow, lines=60), flush=True)
    return row


def add_ratios(rows, anchor):
    """Each timing row gains jla's ms over its sync ms (above 1: we are faster): jla's sync ms of
    this run where it ran, else the anchor's; and, where the chunk form's memory was planned
    (`--memory`), its fwd+bwd peak bytes over the chunk form's (the issue's bar: at most 1)."""
    run = rows.get("jla_run", {})
    if "fwd_sync_ms" in run:
        anchor = {k + "_ms": run[k + "_sync_ms"] for k in ("fwd", "fwdbwd")
                  if k + "_sync_ms" in run}
    chunk = rows.get("chunk_memory", {}).get("fwdbwd_mem_bytes")
    for name, r in rows.items():
        if chunk and r.get("fwdbwd_mem_bytes") and name != "chunk_memory":
            r["fwdbwd_mem_over_chunk"] = round(r["fwdbwd_mem_bytes"] / chunk, 3)
        if name == "jla_run":
            continue
        for k in ("fwd", "fwdbwd"):
            if f"{k}_sync_ms" in r and k + "_ms" in anchor:
                r[f"{k}_jla_over_ours"] = round(anchor[k + "_ms"] / r[f"{k}_sync_ms"], 3)


def attempt(label, fn, *a):
    t0 = time.perf_counter()
    try:
        out = fn(*a)
        print(f"{label}: {out}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        return out
    except Exception as e:  # noqa: BLE001 - a failure is this item's result
        print(f"{label} FAILED:\n{tail(e, 20)}", flush=True)
        return {"error": tail(e, 8)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ops", default="selective,mlstm")
    p.add_argument("--semantics", default="lane,warpgroup")
    p.add_argument("--variants", default="default", help=f"selective: of {sorted(VARIANTS)}")
    p.add_argument("--ml-variants", default="default", help=f"mlstm: of {sorted(ML_VARIANTS)}")
    p.add_argument("--no-jla", action="store_true", help="skip jla's kernels in this run")
    p.add_argument("--no-triton", action="store_true", help="skip our Triton kernels' timings")
    p.add_argument("--ml-shapes", default=",".join(f"{b}x{t}" for b, t in ML_SHAPES),
                   help="mLSTM timings at these BxT (H = 16, K = V = 128)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", action="store_true",
                   help="per-kernel device times of every fwdbwd timed (a profiler trace)")
    p.add_argument("--memory", action="store_true",
                   help="each timed fwdbwd's planned peak bytes, and the XLA chunk form's at the "
                        "same shape (row 'chunk_memory', compiled, not run): the issue's bar")
    p.add_argument("--skip-checks", action="store_true",
                   help="timings only, under the first of --semantics")
    p.add_argument("--skip-timings", action="store_true", help="checks only")
    p.add_argument("--sel-batches", default="4",
                   help="selective timings at these B (T, D, N as the anchor's); a walk bound "
                        "by its per-step latency takes the same time at B = 1 as at 4 while the "
                        "CTAs fit the SMs (NOTES_ssm.md, session 18)")
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(dev.device_kind, "jax", jax.__version__, flush=True)
    path = os.path.join(anchor_files.DIR, f"{anchor_files.slug(dev.device_kind)}-anchors.json")
    scans = json.load(open(path)).get("scans", {}) if os.path.exists(path) else {}
    which = args.ops.split(",")
    has_mlstm = importlib.util.find_spec("linear_jax.kernels.gpu.hopper.mlstm") is not None
    jla = not args.no_jla and importlib.util.find_spec("jla") is not None
    results = {"checks": {}, "timings": {}}
    slug = dev.device_kind.replace(" ", "_")

    def save():
        common.write_json(f"hopper_ssm_gpu_{slug}.json", [results], tolerance=TOL,
                          anchors=scans, note="checks: relative norm errors vs the float32 "
                          "recurrent reference; timings: ms, device (10 back-to-back calls) "
                          "and sync (each call blocked on the host)")

    sem = None
    if "selective" in which:
        grid = [(2, 1000, 256, 16, 1)] + ([] if args.quick else [(1, 4096, 512, 16, 2)])
        for s in ([] if args.skip_checks else args.semantics.split(",")):
            cfg = HopperSelectiveConfig(semantics=s)
            r = attempt(f"selective check [{s}] {grid[0]}", sel_check, cfg, *grid[0])
            results["checks"][f"selective[{s}]{grid[0]}"] = r
            if "error" not in r:
                sem = s
                break
        sem = sem or args.semantics.split(",")[0]
        for shape in ([] if args.skip_checks else grid[1:]):
            results["checks"][f"selective{shape}"] = attempt(
                f"selective check {shape}", sel_check, HopperSelectiveConfig(semantics=sem),
                *shape)
        # every variant to be timed: a variant's timing is read only beside its passing check
        for v in ([] if args.skip_checks else
                  [v for v in dict.fromkeys(args.variants.split(",")) if v != "default"]):
            results["checks"][f"selective[{v}]{grid[0]}"] = attempt(
                f"selective check [{v}] {grid[0]}", sel_check,
                HopperSelectiveConfig(semantics=sem, **VARIANTS[v]), *grid[0])
        save()
        anchor = scans.get("jla.mamba1 B=4 T=4096 D=2048 N=16 (D, z, softplus dt)", {})
        for bsz in [int(b) for b in args.sel_batches.split(",")]:
            rows = {}
            for v in ([] if args.skip_timings else args.variants.split(",")):
                cfg = HopperSelectiveConfig(semantics=sem, **VARIANTS[v])
                rows[f"mosaic_gpu[{v}]"] = {**attempt(
                    f"selective time mosaic_gpu[{v}] B={bsz}", sel_timing, "pallas:mosaic_gpu",
                    cfg, args.reps, bsz, args.profile, args.memory), "overrides": VARIANTS[v]}
            if not args.skip_timings and not args.no_triton:
                rows["triton"] = attempt(f"selective time triton B={bsz}", sel_timing,
                                         "pallas:triton", None, args.reps, bsz)
            if not args.skip_timings and jla:
                rows["jla_run"] = attempt(f"selective time jla B={bsz}", sel_timing, "jla",
                                          None, args.reps, bsz, args.profile, args.memory)
            if not args.skip_timings and args.memory:
                rows["chunk_memory"] = attempt(
                    f"selective chunk form memory B={bsz}", lambda: {"fwdbwd_mem_bytes": mem_bytes(
                        *sel_setup("chunk", None, bsz)[2::2])})
            ref = anchor if bsz == SEL_SHAPE[0] else {}
            add_ratios(rows, ref)
            results["timings"][f"selective B={bsz} T=4096 D=2048 N=16"] = {"jla": ref, **rows}
            save()
    if "mlstm" in which:
        hcfg = None
        if has_mlstm:
            from linear_jax.kernels.configs import HopperMlstmConfig
            hcfg = HopperMlstmConfig(semantics=sem or "lane")
            ml_cfgs = {v: dataclasses.replace(hcfg, **ML_VARIANTS[v])
                       for v in args.ml_variants.split(",")}
            for shape in ([] if args.skip_checks else
                          [(2, 1000, 4, 128, 128, False), (1, 2048, 4, 128, 128, True)]):
                for v, cfg in ml_cfgs.items():        # every variant to be timed, checked
                    tag = "" if v == "default" else f"[{v}]"
                    results["checks"][f"mlstm{tag}{shape}"] = attempt(
                        f"mlstm check {tag}{shape}", ml_check, cfg, *shape)
            save()
        ml_shapes = [tuple(int(x) for x in bt.split("x")) for bt in args.ml_shapes.split(",")]
        for B, T in ([] if args.skip_timings else ml_shapes):
            anchor = scans.get(f"jla.mlstm B={B} T={T} H=16 K=V=128", {})
            rows = {}
            if has_mlstm:
                for v, cfg in ml_cfgs.items():
                    name = "mosaic_gpu" if v == "default" else f"mosaic_gpu[{v}]"
                    rows[name] = {**attempt(f"mlstm time {name} B={B} T={T}", ml_timing,
                                            "pallas:mosaic_gpu", cfg, B, T, args.reps,
                                            args.profile, args.memory),
                                    "overrides": ML_VARIANTS[v]}
            if not args.no_triton:
                rows["triton"] = attempt(f"mlstm time triton B={B} T={T}", ml_timing,
                                         "pallas:triton", None, B, T, args.reps)
            if jla:
                rows["jla_run"] = attempt(f"mlstm time jla B={B} T={T}", ml_timing, "jla", None,
                                          B, T, args.reps, args.profile, args.memory)
            if args.memory:
                rows["chunk_memory"] = attempt(
                    f"mlstm chunk form memory B={B} T={T}", lambda B=B, T=T: {
                        "fwdbwd_mem_bytes": mem_bytes(*ml_setup("chunk", None, B, T)[2::2])})
            add_ratios(rows, anchor)
            results["timings"][f"mlstm B={B} T={T} H=16 K=V=128"] = {"jla": anchor, **rows}
            save()
    print(json.dumps(results, indent=1, default=str))
    print("semantics:", sem, "config:", dataclasses.asdict(HopperSelectiveConfig(
        semantics=sem or "lane")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
