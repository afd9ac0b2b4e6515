"""The Hopper (Mosaic GPU) GLA kernels (vector gate, `kernels/gpu/hopper/gla.py`) on the device:
correctness, then timings against the jax-linear-attention anchors.

    python -m experiments.benchmarks.hopper_gla_gpu [--quick] [--semantics lane|warpgroup]

(a) Checks: output, final state and gradients (q, k, v, g, initial state) against the float32 XLA
    chunk form run on float32 copies of the same inputs, by relative norm error (tolerance 1e-2):
    packed documents (a boundary inside a chunk and one at a chunk start) with initial states,
    T in {100, 2048}, K = V in {64, 128}, and a strong-decay case (every log decay in [-25, -15]:
    no NaN, exact gate gradient); without --quick also T = 8192, no documents, and K = 100, V = 48
    (padded); float32 inputs refused (ValueError).
(b) Timings: bf16, H = 16, K = V = 128, B = max(1, 16384 // T), T in {2048, 8192, 32768},
    g = log_sigmoid(N(0, 1)) / 16 in float32 [B, T, H, K] (as probe_jla.py): forward and forward
    + backward (grad of sum(o * do) w.r.t. q, k, v, g; every input a jit argument), as the median
    of back-to-back calls (`fwd_ms`, device time) and of calls each blocked on the host
    (`fwd_sync_ms`, how the jla anchors were timed), beside the jla.gla anchors and the ratio
    (anchor / ours, > 1 is faster); then each kernel alone at the first T (every T without
    --quick): gates, walk (with states), reverse walk, grad.
(c) Writes benchmarks/results/hopper_gla_gpu_<device>.json (and a copy under $OUT when set).

A check or timing that fails prints the last 30 lines of its traceback and the script goes on.
The lowering semantics are tried in the order given on the first check; the first that compiles
is used for the rest. Checks of one shape share their compiled functions.
Expected wall time with --quick on an H200: ~2 minutes, mostly compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from linear_jax.kernels.configs import HopperChunkConfig, multiprocessors
from linear_jax.kernels.gpu.hopper import common as hcommon
from linear_jax.kernels.gpu.hopper import gla as hgla

TOL = 1e-2
f32 = jnp.float32


def inputs(B, T, H, K, V, *, gate, dtype, seed, extras):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)   # noqa: E731
    x = {"q": jnp.asarray(n(B, T, H, K), dtype),
         "k": jnp.asarray(n(B, T, H, K) / np.sqrt(K), dtype),
         "v": jnp.asarray(n(B, T, H, V), dtype),
         "do": jnp.asarray(n(B, T, H, V), dtype),
         "dS": jnp.asarray(n(B, H, K, V)), "S0": None, "seg": None}
    if gate == "strong":
        x["g"] = jnp.asarray(-15.0 - 10.0 * rng.uniform(size=(B, T, H, K)), f32)
    else:
        x["g"] = jax.nn.log_sigmoid(jnp.asarray(n(B, T, H, K))) / 16
    if extras:
        x["S0"] = jnp.asarray(n(B, H, K, V))
        x["seg"] = segments(B, T, rng)
    return x


def kernel_call(cfg, K):
    def call(x):
        return hgla.gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5, initial_state=x["S0"],
                        segment_ids=x["seg"], chunk_size=64, config=cfg)
    return call


def reference_call(K):
    def call(x):
        return ops.gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5, initial_state=x["S0"],
                       segment_ids=x["seg"], impl="chunk")
    return call


@functools.cache
def jitted(call_of, cfg, K, names):
    """(forward, grads of sum(o * do) + sum(S * dS) w.r.t. the named inputs), jitted once per
    (kernel or reference, config, K, names): checks of one shape share their compiles."""
    call = call_of(cfg, K) if cfg is not None else call_of(K)

    def loss(x, *a):
        o, S = call({**x, **dict(zip(names, a, strict=True))})
        return jnp.sum(o.astype(f32) * x["do"].astype(f32)) + jnp.sum(S * x["dS"]), (o, S)

    argnums = tuple(range(1, len(names) + 1))
    return jax.jit(call), jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))


def run_check(name, cfg, B, T, H, K, V, *, gate, extras, seed):
    x = inputs(B, T, H, K, V, gate=gate, dtype=jnp.bfloat16, seed=seed, extras=extras)
    names = ("q", "k", "v", "g") + (("S0",) if x["S0"] is not None else ())
    kern_fwd, kern_grad = jitted(kernel_call, cfg, K, names)
    _, ref_grad = jitted(reference_call, None, K, names)
    xf = {k: (v.astype(f32) if k in ("q", "k", "v", "do") else v) for k, v in x.items()}
    t0 = time.perf_counter()
    o_fwd, S_fwd = kern_fwd(x)
    g_k, (o, S) = kern_grad(x, *[x[n] for n in names])
    jax.block_until_ready(g_k)
    secs = time.perf_counter() - t0
    g_r, (o_r, S_r) = ref_grad(xf, *[xf[n] for n in names])
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
        hgla.gla(x, x, x, x, scale=1.0, initial_state=None, segment_ids=None, chunk_size=64)
    except ValueError as e:
        return {"check": "float32 refused", "ok": True, "message": str(e)[:160]}
    return {"check": "float32 refused", "ok": False, "message": "no ValueError"}


def pick_semantics(order, base, first):
    """The first lowering semantics under which the first check (`first`: its run_check
    arguments) compiles and runs, and that check's result."""
    name, B, T, H, K, V, gate, extras = first
    for sem in order:
        cfg = dataclasses.replace(base, semantics=sem)
        try:
            r = run_check(name, cfg, B, T, H, K, V, gate=gate, extras=extras, seed=100)
            print(f"semantics {sem}: compiles and runs")
            return cfg, r
        except Exception as e:  # noqa: BLE001 - report and try the next
            print(f"semantics {sem} FAILED:\n{tail(e)}")
    return None, None


def timing_inputs(T):
    B, H, K, V = max(1, 16384 // T), 16, 128, 128
    rng = np.random.default_rng(T)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)   # noqa: E731
    g = jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((B, T, H, K)), f32)) / 16
    return n(B, T, H, K), n(B, T, H, K), n(B, T, H, V), g, n(B, T, H, V)


def time_shape(cfg, T, args, anchors, *, reps):
    q, k, v, g, do = args
    B, _, H, K = q.shape
    call = lambda q, k, v, g: hgla.gla(                                    # noqa: E731
        q, k, v, g, scale=K**-0.5, initial_state=None, segment_ids=None, chunk_size=64,
        config=cfg)[0]
    fwd = jax.jit(call)
    fwdbwd = jax.jit(jax.grad(lambda q, k, v, g, do: jnp.sum(call(q, k, v, g).astype(f32) *
                                                              do.astype(f32)),
                              argnums=(0, 1, 2, 3)))
    row = {"T": T, "B": B, "H": H, "K": K, "V": v.shape[-1]}
    an = anchors.get(T, {})
    for key, f, a in (("fwd", fwd, (q, k, v, g)), ("fwdbwd", fwdbwd, (q, k, v, g, do))):
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            row[f"{key}_compile_s"] = round(time.perf_counter() - t0, 2)
            row[f"{key}_ms"] = common.median_ms(f, *a, reps=reps, inner=10)
            row[f"{key}_sync_ms"] = common.median_ms(f, *a, reps=30)
            anchor = an.get(f"jla.gla.{key}_ms")
            if anchor:
                row[f"jla_{key}_ms"] = anchor
                row[f"ratio_{key}"] = anchor / row[f"{key}_sync_ms"]
        except Exception as e:  # noqa: BLE001
            row[f"{key}_error"] = tail(e, 8)
            print(f"T={T} {key} FAILED:\n{tail(e)}")
    return row


def kernel_breakdown(cfg, args, *, reps):
    """Device ms of each kernel alone (inputs prepared outside the timed call)."""
    q, k, v, g, do = args
    B, T, H, K = q.shape
    P = cfg.pieces_for(B * H, T // cfg.chunk, multiprocessors(jax.devices()[0]))
    t = lambda f, *a: common.median_ms(f, *a, reps=reps, inner=10)       # noqa: E731
    out = {"pieces": P}
    try:
        gh, gl = hcommon.split_hi_lo(g, q.dtype)
        gates = jax.jit(lambda q, k, gh, gl: hgla.gates(q, k, gh, gl, None, scale=K**-0.5,
                                                        cfg=cfg))
        qt, kt, A, dec = gates(q, k, gh, gl)
        out["gates"] = t(gates, q, k, gh, gl)
        state = jax.jit(lambda y, z, d, rev: hgla.walk(None, y, z, None, d, None, reverse=rev,
                                                       cfg=cfg, pieces=P, emit="state"),
                        static_argnums=3)
        if P > 1:
            out["walk_state_pass"] = t(state, kt, v, dec, False)
            E, dp = state(kt, v, dec, False)
            s0 = hgla.piece_states(E, dp, None, reverse=False)
        else:
            s0 = None
        walk = lambda res, rev: jax.jit(lambda x, y, z, A, d, s0: hgla.walk(   # noqa: E731
            x, y, z, A, d, s0, reverse=rev, cfg=cfg, residuals=res, pieces=P))
        out["walk"] = t(walk(False, False), qt, kt, v, A, dec, s0)
        out["walk_states"] = t(walk(True, False), qt, kt, v, A, dec, s0)
        _, _, states = walk(True, False)(qt, kt, v, A, dec, s0)
        _, _, dstates = walk(True, True)(kt, qt, do, A, dec, s0)
        out["walk_rev_states"] = t(walk(True, True), kt, qt, do, A, dec, s0)
        gradf = jax.jit(lambda *a: hgla.grad(*a, scale=K**-0.5, cfg=cfg))
        out["grad"] = t(gradf, q, k, v, do, gh, gl, None, states, dstates)
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
    grid = [("docs+h0", 2, 100, 2, 64, 64, "normal", True),
            ("docs+h0", 2, 2048, 4, 128, 128, "normal", True),
            ("strong decay+docs+h0", 2, 2048, 4, 128, 128, "strong", True)]
    cfg, first = pick_semantics(a.semantics.split(","), HopperChunkConfig.default(dev), grid[0])
    checks, rows = [], []
    if cfg is None:
        print("no lowering semantics compiled: nothing else to run")
    else:
        print("config", cfg)
        if not a.quick:
            grid += [("plain", 2, 2048, 4, 64, 64, "normal", False),
                     ("docs+h0", 1, 8192, 4, 128, 128, "normal", True),
                     ("strong decay", 1, 300, 2, 64, 64, "strong", False),
                     ("K=100 V=48 (padded)+docs+h0", 2, 300, 2, 100, 48, "normal", True)]
        for i, (name, B, T, H, K, V, gate, extras) in enumerate([] if a.skip_checks else grid):
            try:
                r = first if i == 0 else run_check(name, cfg, B, T, H, K, V, gate=gate,
                                                   extras=extras, seed=100 + i)
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
            args = timing_inputs(T)
            reps = 10 if a.quick else a.reps
            rows.append(time_shape(cfg, T, args, anchors, reps=reps))
            if (not a.quick) or T == a.T[0]:
                rows[-1]["kernels_ms"] = kernel_breakdown(cfg, args, reps=reps)
            print(rows[-1])
        print(f"\ngla\n{'T':>6} {'fwd ms':>8} {'sync':>8} {'jla':>7} {'ratio':>6} | "
              f"{'fwdbwd':>8} {'sync':>8} {'jla':>7} {'ratio':>6}")
        for r in rows:
            c = lambda key, r=r: f"{r.get(key, float('nan')):8.3f}"         # noqa: E731
            print(f"{r['T']:>6} {c('fwd_ms')} {c('fwd_sync_ms')} {r.get('jla_fwd_ms', 0):7.3f} "
                  f"{r.get('ratio_fwd', 0):6.2f} | {c('fwdbwd_ms')} {c('fwdbwd_sync_ms')} "
                  f"{r.get('jla_fwdbwd_ms', 0):7.3f} {r.get('ratio_fwdbwd', 0):6.2f}")
        for r in rows:
            if "kernels_ms" in r:
                print(f"T={r['T']} kernels (device ms):", r["kernels_ms"])
    n_fail = sum(not c["ok"] for c in checks)
    print(f"\nchecks: {len(checks) - n_fail} passed, {n_fail} failed; "
          f"{time.perf_counter() - t_start:.0f} s")
    slug = dev.device_kind.replace(" ", "_")
    path = common.write_json(f"hopper_gla_gpu_{slug}.json", rows, checks=checks,
                             config=dataclasses.asdict(cfg) if cfg else None,
                             quick=a.quick, tolerance=TOL,
                             shapes="bf16, H=16, K=V=128, B=max(1, 16384 // T); g = "
                                    "log_sigmoid(N(0,1))/16 float32 [B,T,H,K]; checks bf16 vs "
                                    "float32 chunk form on the same values")
    print("wrote", path)
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])
    return 0 if (cfg is not None and n_fail == 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
