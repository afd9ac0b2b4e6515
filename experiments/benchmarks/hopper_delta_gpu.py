"""The Hopper (Mosaic GPU) delta-rule kernels on the device: correctness, then timings against the
anchors.

    python -m experiments.benchmarks.hopper_delta_gpu [--quick] [--semantics lane|warpgroup]

(a) Checks: gated_delta_rule and delta_rule (g = None) output, final state and gradients (q, k, v,
    beta, g, initial state) against the float32 XLA chunk form run on float32 copies of the same
    inputs, by relative norm error: keys l2-normalised, beta = sigmoid, packed documents
    (boundaries inside chunks and at chunk starts) with initial states, a strong-decay case (g down
    to -20 per step: no NaN, exact gate gradient), T in {100, 2048} (+ 8192 and padded K, V
    without --quick), K = V in {64, 128}; and float32 inputs refused (ValueError).
(b) Timings: bf16, H = 16, K = V = 128, B = max(1, 16384 // T), T in {2048, 8192, 32768}: forward
    and forward + backward (grad of sum(o * do) w.r.t. q, k, v, beta, g; every input a jit
    argument) of both ops, as the median of back-to-back calls (`*_ms`, device time) and of calls
    each blocked on the host (`*_sync_ms`, how the jla anchors were timed), beside the jla anchors
    (deltanet, gated_deltanet) and the ratio (anchor / ours, > 1 is faster); and each kernel alone
    (UT prep, forward walk with and without residuals, reverse walk, gradient kernel) at T = 2048
    (every T without --quick).
(c) Writes benchmarks/results/hopper_delta_gpu_<device>.json (and a copy under $OUT when set).

A check or timing that fails prints the last 30 lines of its traceback; the script goes on. The
lowering semantics is tried in the order given and the first that compiles is used for the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import anchors as anchor_files
from experiments.benchmarks import common
from experiments.benchmarks.hopper_gpu import rel, segments, tail
from linear_jax import ops
from linear_jax.kernels.configs import HopperDeltaConfig
from linear_jax.kernels.gpu.hopper import delta as hdelta
from linear_jax.kernels.gpu.hopper import delta_bwd as hbwd

TOL = 1e-2
f32 = jnp.float32
OPS = {True: "gated_deltanet", False: "deltanet"}      # anchor names, by `gated`


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


def loss_and_grads(call, x, names):
    def loss(*a):
        o, S = call({**x, **dict(zip(names, a, strict=True))})
        return jnp.sum(o.astype(f32) * x["do"].astype(f32)) + jnp.sum(S * x["dS"]), (o, S)
    return jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True)


def run_check(name, cfg, B, T, H, K, V, *, gate, extras, seed):
    x = inputs(B, T, H, K, V, gate=gate, dtype=jnp.bfloat16, seed=seed, extras=extras)
    names = ["q", "k", "v", "beta"] + (["g"] if x["g"] is not None else []) + \
        (["S0"] if x["S0"] is not None else [])
    kern, ref = kernel_call(cfg, K), reference_call(K)
    xf = {k: (v.astype(f32) if k in ("q", "k", "v", "do") else v) for k, v in x.items()}
    t0 = time.perf_counter()
    o_fwd, S_fwd = jax.jit(kern)(x)
    g_k, (o, S) = jax.jit(loss_and_grads(kern, x, names))(*[x[n] for n in names])
    jax.block_until_ready(g_k)
    secs = time.perf_counter() - t0
    g_r, (o_r, S_r) = jax.jit(loss_and_grads(ref, xf, names))(*[xf[n] for n in names])
    errs = {"o": rel(o_fwd.astype(f32), o_r), "S": rel(S_fwd, S_r),
            "o_vjp": rel(o.astype(f32), o_r), "S_vjp": rel(S, S_r)}
    for n, a, b in zip(names, g_k, g_r, strict=True):
        errs["d" + n] = rel(jnp.asarray(a, f32), b)
    ok = all(e <= TOL for e in errs.values())
    return {"check": name, "T": T, "K": K, "V": V, "B": B, "H": H, "gate": gate,
            "extras": extras, "ok": ok, "compile_run_s": round(secs, 1),
            "errors": {k: float(f"{v:.3g}") for k, v in errs.items()}}


def check_float32_refused():
    x = jnp.zeros((1, 64, 1, 64), f32)
    try:
        hdelta.delta(x, x, x, None, x[..., 0], scale=1.0, initial_state=None, segment_ids=None,
                     chunk_size=64)
    except ValueError as e:
        return {"check": "float32 refused", "ok": True, "message": str(e)[:160]}
    return {"check": "float32 refused", "ok": False, "message": "no ValueError"}


def pick_semantics(order, base):
    """The first lowering semantics whose forward + backward compiles and runs at a small shape."""
    for sem in order:
        cfg = dataclasses.replace(base, semantics=sem)
        try:
            run_check("probe", cfg, 1, 128, 2, 128, 128, gate="normal", extras=True, seed=0)
            print(f"semantics {sem}: compiles and runs")
            return cfg
        except Exception as e:  # noqa: BLE001 - report and try the next
            print(f"semantics {sem} FAILED:\n{tail(e)}")
    return None


def time_shape(cfg, T, anchors, *, reps, breakdown):
    B, H, K, V = max(1, 16384 // T), 16, 128, 128
    x = inputs(B, T, H, K, V, gate="normal", dtype=jnp.bfloat16, seed=T, extras=False)
    q, k, v, do, g = x["q"], x["k"], x["v"], x["do"], x["g"]
    beta = x["beta"].astype(jnp.bfloat16)
    row = {"T": T, "B": B, "H": H, "K": K, "V": V}
    an = anchors.get(T, {})
    for gated in (True, False):
        op = OPS[gated]

        def call(q, k, v, beta, g, gated=gated):
            return hdelta.delta(q, k, v, g if gated else None, beta, scale=K**-0.5,
                                initial_state=None, segment_ids=None, chunk_size=64,
                                config=cfg)[0]

        argn = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)
        fwd = jax.jit(call)
        fwdbwd = jax.jit(jax.grad(lambda q, k, v, beta, g, do, call=call: jnp.sum(
            call(q, k, v, beta, g).astype(f32) * do.astype(f32)), argnums=argn))
        for key, f, args in (("fwd", fwd, (q, k, v, beta, g)),
                             ("fwdbwd", fwdbwd, (q, k, v, beta, g, do))):
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                row[f"{op}.{key}_compile_s"] = round(time.perf_counter() - t0, 2)
                row[f"{op}.{key}_ms"] = common.median_ms(f, *args, reps=reps, inner=10)
                row[f"{op}.{key}_sync_ms"] = common.median_ms(f, *args, reps=30)
                a = an.get(f"jla.{op}.{key}_ms")
                if a:
                    row[f"jla.{op}.{key}_ms"] = a
                    row[f"{op}.ratio_{key}"] = a / row[f"{op}.{key}_sync_ms"]
            except Exception as e:  # noqa: BLE001
                row[f"{op}.{key}_error"] = tail(e, 8)
                print(f"T={T} {op} {key} FAILED:\n{tail(e)}")
    if breakdown:
        row["kernels_ms"] = kernel_breakdown(cfg, q, k, v, beta, g, do, reps=reps)
    return row


def kernel_breakdown(cfg, q, k, v, beta, g, do, *, reps):
    """Device ms of each kernel of the gated rule alone (inputs prepared outside the timed call)."""
    B, T, H, K = q.shape
    V, C = v.shape[-1], cfg.chunk
    kw = dict(cfg=cfg)
    rows, names = hdelta.delta_rows(g, None, beta, scale=K**-0.5, C=C, H=H)
    s0 = hdelta.split_state(jnp.zeros((B, H, K, V), f32), q.dtype)
    t = lambda f, *a: common.median_ms(f, *a, reps=reps, inner=10)
    out = {}
    try:
        prep = lambda res: jax.jit(lambda k, v, r: hdelta.prep(k, v, r, names=names,
                                                              residuals=res, **kw))
        out["prep"] = t(prep(False), k, v, rows)
        wm, u0, tm = prep(True)(k, v, rows)
        out["prep_with_T"] = t(prep(True), k, v, rows)
        walk = lambda res: jax.jit(lambda *a: hdelta.walk(*a, names=names, scale=K**-0.5,
                                                           residuals=res, **kw))
        out["walk"] = t(walk(False), q, k, wm, u0, rows, s0)
        _, _, _, states, u = walk(True)(q, k, wm, u0, rows, s0)
        out["walk_residuals"] = t(walk(True), q, k, wm, u0, rows, s0)
        rev = jax.jit(lambda *a: hbwd.walk_rev(*a, names=names, scale=K**-0.5, **kw))
        dbv, _, _, dstates = rev(q, k, do, wm, tm, rows, s0)
        out["walk_rev"] = t(rev, q, k, do, wm, tm, rows, s0)
        gradf = jax.jit(lambda *a: hbwd.grad(*a, names=names, scale=K**-0.5, **kw))
        out["grad"] = t(gradf, q, k, do, u, dbv, rows, states, dstates)
    except Exception as e:  # noqa: BLE001
        out["error"] = tail(e, 8)
        print(f"kernel breakdown FAILED:\n{tail(e)}")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--semantics", default="lane,warpgroup",
                   help="lowering semantics to try, in order")
    p.add_argument("--T", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--skip-checks", action="store_true")
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    print("device", dev.device_kind, "jax", jax.__version__, "SMs", getattr(dev, "core_count", "?"))
    t_start = time.perf_counter()
    base = HopperDeltaConfig.default(dev)
    cfg = pick_semantics(a.semantics.split(","), base)
    checks, rows = [], []
    if cfg is None:
        print("no lowering semantics compiled: nothing else to run")
    else:
        print("config", cfg)
        grid = [("gated+docs+h0", 2, 100, 2, 64, 64, "normal", True),
                ("gated+docs+h0", 2, 2048, 4, 128, 128, "normal", True),
                ("delta_rule+docs+h0", 2, 2048, 4, 64, 64, None, True),
                ("delta_rule", 2, 100, 2, 128, 128, None, False),
                ("strong decay+docs+h0", 2, 2048, 4, 128, 128, "strong", True)]
        if not a.quick:
            grid += [("gated+docs+h0", 2, 100, 2, 128, 128, "normal", True),
                     ("gated", 2, 2048, 4, 64, 64, "normal", False),
                     ("delta_rule+docs+h0", 2, 2048, 4, 128, 128, None, True),
                     ("gated+docs+h0", 1, 8192, 4, 128, 128, "normal", True),
                     ("delta_rule+docs+h0", 1, 8192, 4, 64, 64, None, True),
                     ("gated, K=100 V=48 (padded)", 2, 300, 2, 100, 48, "normal", True)]
        for i, (name, B, T, H, K, V, gate, extras) in enumerate([] if a.skip_checks else grid):
            try:
                r = run_check(name, cfg, B, T, H, K, V, gate=gate, extras=extras, seed=100 + i)
            except Exception as e:  # noqa: BLE001
                r = {"check": name, "T": T, "K": K, "ok": False, "error": tail(e, 8)}
                print(f"check {name} T={T} K={K} FAILED:\n{tail(e)}")
            checks.append(r)
            print(("PASS" if r["ok"] else "FAIL"), name, f"T={T} K={K} V={V}",
                  r.get("errors", r.get("error", "")))
        checks.append(check_float32_refused())
        print(("PASS" if checks[-1]["ok"] else "FAIL"), checks[-1]["check"])

        anchor_path, anchors = anchor_files.anchors_for(dev.device_kind)
        print("anchors", anchor_path)
        for T in a.T:
            rows.append(time_shape(cfg, T, anchors, reps=10 if a.quick else a.reps,
                                   breakdown=(not a.quick) or T == a.T[0]))
            print(rows[-1])
        for op in OPS.values():
            print(f"\n{op}\n{'T':>6} {'fwd ms':>8} {'sync':>8} {'jla':>7} {'ratio':>6} | "
                  f"{'fwdbwd':>8} {'sync':>8} {'jla':>7} {'ratio':>6}")
            for r in rows:
                c = lambda key, r=r: f"{r.get(f'{op}.{key}', float('nan')):8.3f}"
                print(f"{r['T']:>6} {c('fwd_ms')} {c('fwd_sync_ms')} "
                      f"{r.get(f'jla.{op}.fwd_ms', 0):7.3f} {r.get(f'{op}.ratio_fwd', 0):6.2f} | "
                      f"{c('fwdbwd_ms')} {c('fwdbwd_sync_ms')} "
                      f"{r.get(f'jla.{op}.fwdbwd_ms', 0):7.3f} "
                      f"{r.get(f'{op}.ratio_fwdbwd', 0):6.2f}")
        for r in rows:
            if "kernels_ms" in r:
                print(f"T={r['T']} kernels (device ms, gated):", r["kernels_ms"])
    n_fail = sum(not c["ok"] for c in checks)
    print(f"\nchecks: {len(checks) - n_fail} passed, {n_fail} failed; "
          f"{time.perf_counter() - t_start:.0f} s")
    slug = dev.device_kind.replace(" ", "_")
    path = common.write_json(f"hopper_delta_gpu_{slug}.json", rows, checks=checks,
                             config=dataclasses.asdict(cfg) if cfg else None,
                             quick=a.quick, tolerance=TOL,
                             shapes="bf16, H=16, K=V=128, B=max(1, 16384 // T); q, k "
                                    "l2-normalised, beta = sigmoid, g = log_sigmoid(N(0,1))/16; "
                                    "checks bf16 vs float32 chunk form on the same values")
    print("wrote", path)
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])
    return 0 if (cfg is not None and n_fail == 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
