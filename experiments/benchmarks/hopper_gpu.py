"""The Hopper (Mosaic GPU) kernels on the device: correctness, then timings against the anchors.

    python -m experiments.benchmarks.hopper_gpu [--quick] [--semantics lane|warpgroup]

(a) Checks: every kernel's output, final state and gradients (q, k, v, g, initial state) against
    the float32 XLA chunk form run on float32 copies of the same inputs, by relative norm error,
    fresh random inputs per check, with initial states and packed documents (boundaries inside
    chunks and at chunk starts), a no-gate case (linear attention), a strong-decay case (g down to
    -20 per step: no NaN, exact gate gradient) and float32 inputs (the kernels refuse them with a
    ValueError: checked). T in {100, 2048} (--quick) or {100, 2048, 8192}, K = V in {64, 128}.
(b) Timings: bf16, H = 16, K = V = 128, B T = 16384, T in {2048, 8192, 32768}: forward and
    forward + backward (grad of sum(o * do) w.r.t. q, k, v, g; every input a jit argument), each
    as the median of back-to-back calls (`*_ms`, device time) and of calls each blocked on the host
    (`*_sync_ms`, how the jla anchors were timed), beside the jla anchor and the ratio
    (anchor / ours, > 1 is faster); and the time of each kernel alone (forward walk, the same with
    its states written, reverse walk, gradient kernel).
(c) Writes benchmarks/results/hopper_gpu_<device>.json (device, jax version, shapes, ms, errors).

A kernel that fails to compile or run prints the last 30 lines of its traceback; the script goes
on. The lowering semantics (Lane, jax 0.10's default, or Warpgroup, 0.11's) is tried in the order
given and the first that compiles is used for everything after.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import anchors as anchor_files
from experiments.benchmarks import common
from linear_jax import ops
from linear_jax.kernels.configs import HopperChunkConfig
from linear_jax.kernels.gpu.hopper import common as hcommon
from linear_jax.kernels.gpu.hopper import decay as hopper_decay

TOL = 1e-2
f32 = jnp.float32


def tail(e: BaseException, n: int = 30) -> str:
    lines = "".join(traceback.format_exception(e)).rstrip().splitlines()
    return "\n".join(lines[-n:])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def segments(B, T, rng):
    """Packed documents: one boundary inside a chunk, one at a chunk start, per batch row."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = {int(rng.integers(1, T))}
        if T > 64:
            cuts.add(64 * int(rng.integers(1, -(-T // 64))))
        for c in cuts:
            ids[b, c:] += 1
    return jnp.asarray(ids)


def inputs(B, T, H, K, V, *, gate, dtype, seed, extras):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)
    x = {"q": jnp.asarray(n(B, T, H, K), dtype),
         "k": jnp.asarray(n(B, T, H, K) / np.sqrt(K), dtype),
         "v": jnp.asarray(n(B, T, H, V), dtype),
         "do": jnp.asarray(n(B, T, H, V), dtype),
         "dS": jnp.asarray(n(B, H, K, V)),
         "g": None, "S0": None, "seg": None}
    if gate == "normal":
        x["g"] = jax.nn.log_sigmoid(jnp.asarray(n(B, T, H))) / 16
    elif gate == "strong":
        x["g"] = jnp.asarray(-20.0 * rng.uniform(size=(B, T, H)), f32)
    if extras:
        x["S0"] = jnp.asarray(n(B, H, K, V))
        x["seg"] = segments(B, T, rng)
    return x


def loss_and_grads(call, x, names):
    """(o, S) and the grads of sum(o * do) + sum(S * dS) w.r.t. the named inputs."""
    def loss(*a):
        kw = dict(zip(names, a, strict=True))
        o, S = call({**x, **kw})
        return jnp.sum(o.astype(f32) * x["do"].astype(f32)) + jnp.sum(S * x["dS"]), (o, S)
    return jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True)


def run_check(name, cfg, B, T, H, K, V, *, gate, extras, seed):
    x = inputs(B, T, H, K, V, gate=gate, dtype=jnp.bfloat16, seed=seed, extras=extras)
    names = ["q", "k", "v"] + (["g"] if x["g"] is not None else []) + \
        (["S0"] if x["S0"] is not None else [])

    def kern(x):
        return hopper_decay.simple_gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5,
                                       initial_state=x["S0"], segment_ids=x["seg"],
                                       chunk_size=64, config=cfg)

    def ref(x):
        return ops.simple_gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5,
                              initial_state=x["S0"], segment_ids=x["seg"], impl="chunk")

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
        hopper_decay.simple_gla(x, x, x, None, scale=1.0, initial_state=None, segment_ids=None,
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
    B, H, K, V = 16384 // T, 16, 128, 128
    rng = np.random.default_rng(T)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
    q, k, v, do = n(B, T, H, K), n(B, T, H, K), n(B, T, H, V), n(B, T, H, V)
    g = jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((B, T, H)), f32)) / 16
    call = lambda q, k, v, g: hopper_decay.simple_gla(
        q, k, v, g, scale=K**-0.5, initial_state=None, segment_ids=None, chunk_size=64,
        config=cfg)[0]
    fwd = jax.jit(call)
    fwdbwd = jax.jit(jax.grad(lambda q, k, v, g, do: jnp.sum(call(q, k, v, g).astype(f32) *
                                                              do.astype(f32)),
                              argnums=(0, 1, 2, 3)))
    row = {"T": T, "B": B, "H": H, "K": K, "V": V}
    an = anchors.get(T, {})
    for key, f, args in (("fwd", fwd, (q, k, v, g)), ("fwdbwd", fwdbwd, (q, k, v, g, do))):
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            row[f"{key}_compile_s"] = round(time.perf_counter() - t0, 2)
            row[f"{key}_ms"] = common.median_ms(f, *args, reps=reps, inner=10)
            row[f"{key}_sync_ms"] = common.median_ms(f, *args, reps=30)
            a = an.get(f"jla.simple_gla.{key}_ms")
            if a:
                row[f"jla_{key}_ms"] = a
                row[f"ratio_{key}"] = a / row[f"{key}_sync_ms"]
        except Exception as e:  # noqa: BLE001
            row[f"{key}_error"] = tail(e, 8)
            print(f"T={T} {key} FAILED:\n{tail(e)}")
    if breakdown:
        row["kernels_ms"] = kernel_breakdown(cfg, q, k, v, g, do, reps=reps)
    return row


def kernel_breakdown(cfg, q, k, v, g, do, *, reps):
    """Device ms of each kernel alone (inputs prepared outside the timed call)."""
    B, T, H, K = q.shape
    C = cfg.chunk
    rows, names = hcommon.gate_rows(g, None, scale=K**-0.5, C=C, H=H)
    h0 = jnp.zeros((B, H, K, v.shape[-1]), f32)
    kw = dict(names=names, scale=K**-0.5, cfg=cfg)
    walk = lambda res, rev: jax.jit(lambda x, y, z, r, s: hopper_decay.walk(
        x, y, z, r, s, read_row="gk" if rev else "gq", write_row="gq" if rev else "gk",
        reverse=rev, residuals=res, **kw))
    out = {}
    try:
        out["walk_fwd"] = common.median_ms(walk(False, False), q, k, v, rows, h0, reps=reps,
                                           inner=10)
        f = walk(True, False)
        _, _, states = f(q, k, v, rows, h0)
        out["walk_fwd_states"] = common.median_ms(f, q, k, v, rows, h0, reps=reps, inner=10)
        f = walk(True, True)
        _, _, dstates = f(k, q, do, rows, h0)
        out["walk_rev"] = common.median_ms(f, k, q, do, rows, h0, reps=reps, inner=10)
        gradf = jax.jit(lambda *a: hopper_decay.grad(*a, **kw))
        out["grad"] = common.median_ms(gradf, q, k, v, do, rows, states, dstates, reps=reps,
                                       inner=10)
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
    base = HopperChunkConfig.default(dev)
    cfg = pick_semantics(a.semantics.split(","), base)
    checks, rows = [], []
    if cfg is None:
        print("no lowering semantics compiled: nothing else to run")
    else:
        print("config", cfg)
        grid = [("gated+docs+h0", 2, 100, 2, 64, 64, "normal", True),
                ("gated+docs+h0", 2, 2048, 4, 128, 128, "normal", True),
                ("linear attention", 2, 2048, 4, 64, 64, None, False),
                ("strong decay", 2, 2048, 4, 128, 128, "strong", True)]
        if not a.quick:
            grid += [("gated+docs+h0", 2, 100, 2, 128, 128, "normal", True),
                     ("gated+docs+h0", 2, 2048, 4, 64, 64, "normal", True),
                     ("gated+docs+h0", 1, 8192, 4, 128, 128, "normal", True),
                     ("linear attention+docs+h0", 1, 8192, 4, 64, 64, None, True),
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
            rows.append(time_shape(cfg, T, anchors, reps=a.reps,
                                   breakdown=(not a.quick) or T == a.T[0]))
            print(rows[-1])
        print(f"\n{'T':>6} {'fwd ms':>8} {'sync':>8} {'jla':>7} {'ratio':>6} | "
              f"{'fwdbwd':>8} {'sync':>8} {'jla':>7} {'ratio':>6}")
        for r in rows:
            c = lambda key: f"{r.get(key, float('nan')):8.3f}"
            print(f"{r['T']:>6} {c('fwd_ms')} {c('fwd_sync_ms')} {r.get('jla_fwd_ms', 0):7.3f} "
                  f"{r.get('ratio_fwd', 0):6.2f} | {c('fwdbwd_ms')} {c('fwdbwd_sync_ms')} "
                  f"{r.get('jla_fwdbwd_ms', 0):7.3f} {r.get('ratio_fwdbwd', 0):6.2f}")
            if "kernels_ms" in r:
                print("       kernels (device ms):", r["kernels_ms"])
    n_fail = sum(not c["ok"] for c in checks)
    print(f"\nchecks: {len(checks) - n_fail} passed, {n_fail} failed; "
          f"{time.perf_counter() - t_start:.0f} s")
    slug = dev.device_kind.replace(" ", "_")
    path = common.write_json(f"hopper_gpu_{slug}.json", rows, checks=checks,
                             config=dataclasses.asdict(cfg) if cfg else None,
                             quick=a.quick, tolerance=TOL,
                             shapes="bf16, H=16, K=V=128, B*T=16384; checks bf16 vs float32 "
                                    "chunk form on the same values")
    print("wrote", path)
    return 0 if (cfg is not None and n_fail == 0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
