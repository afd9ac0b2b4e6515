"""What the device scripts of the Hopper kernels share: checking a kernel against the float32 chunk
form on the same values, picking the lowering semantics that compiles, timing forward and forward +
backward beside the jax-linear-attention anchors, and the closing summary and JSON.

A check row holds the relative norm error of the output, the final state, the output and state
through the VJP's forward, and the gradient of every named input, of
`loss = sum(o * do) + sum(S * dS)`; `ok` when all are within the tolerance.

A timing row holds, per phase (`fwd`, `fwdbwd`): the first call's compile + run seconds, the median
of back-to-back calls (`<phase>_ms`, device time), the median of calls each blocked on the host
(`<phase>_sync_ms`, how the anchors were timed), the anchor and the ratio anchor / ours sync (> 1 is
faster). One row may time several ops: `key` names each field (`lambda s: f"{op}.{s}"`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks import profile as kernel_profile

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


def loss_and_grads(call, names):
    """f(x, *a): grads of sum(o * do) + sum(S * dS) w.r.t. `a` (the inputs `names` of x), with
    (o, S) as aux; x a dict holding every input of `call` and `do`, `dS`."""
    def loss(x, *a):
        o, S = call({**x, **dict(zip(names, a, strict=True))})
        return jnp.sum(o.astype(f32) * x["do"].astype(f32)) + jnp.sum(S * x["dS"]), (o, S)
    return jax.grad(loss, argnums=tuple(range(1, len(names) + 1)), has_aux=True)


def as_float32(x: dict) -> dict:
    return {k: (v.astype(f32) if k in ("q", "k", "v", "do") else v) for k, v in x.items()}


def check(x, names, kernel, reference, *, tol, **meta) -> dict:
    """The check row of `kernel` (fwd, grad: jitted functions of x, as `loss_and_grads` gives)
    against `reference` run on float32 copies of x; `meta` names the case."""
    fwd, grad = kernel
    t0 = time.perf_counter()
    o_fwd, S_fwd = fwd(x)
    g_k, (o, S) = grad(x, *[x[n] for n in names])
    jax.block_until_ready(g_k)
    secs = time.perf_counter() - t0
    xf = as_float32(x)
    g_r, (o_r, S_r) = reference(xf, *[xf[n] for n in names])
    errs = {"o": rel(o_fwd.astype(f32), o_r), "S": rel(S_fwd, S_r),
            "o_vjp": rel(o.astype(f32), o_r), "S_vjp": rel(S, S_r)}
    for n, a, b in zip(names, g_k, g_r, strict=True):
        errs["d" + n] = rel(jnp.asarray(a, f32), b)
    return {**meta, "ok": all(e <= tol for e in errs.values()), "compile_run_s": round(secs, 1),
            "errors": {k: float(f"{v:.3g}") for k, v in errs.items()}}


def run_grid(grid, run, done=None) -> list:
    """Each case of `grid` ((name, B, T, H, K, V, gate, extras), ...) through `run(i, case)`; a
    case that raises is a failed row with its traceback's tail. `done`: rows already run for the
    first cases (e.g. the semantics probe's)."""
    rows = list(done or [])
    for i, case in enumerate(grid[len(rows):], len(rows)):
        name, _, T, _, K, V = case[:6]
        try:
            r = run(i, case)
        except Exception as e:  # noqa: BLE001 - one failed case is a row, the rest go on
            r = {"check": name, "T": T, "K": K, "ok": False, "error": tail(e, 8)}
            print(f"check {name} T={T} K={K} FAILED:\n{tail(e)}")
        rows.append(r)
        print(("PASS" if r["ok"] else "FAIL"), name, f"T={T} K={K} V={V}",
              r.get("errors", r.get("error", "")), flush=True)
    return rows


def float32_refused(call) -> dict:
    """The kernel refuses float32 inputs with a ValueError (`call()` makes the attempt)."""
    try:
        call()
    except ValueError as e:
        row = {"check": "float32 refused", "ok": True, "message": str(e)[:160]}
    else:
        row = {"check": "float32 refused", "ok": False, "message": "no ValueError"}
    print(("PASS" if row["ok"] else "FAIL"), row["check"])
    return row


def pick_semantics(order, base, probe):
    """(config, probe's result) for the first lowering semantics under which `probe(config)`
    compiles and runs; (None, None) if none does."""
    for sem in order:
        cfg = dataclasses.replace(base, semantics=sem)
        try:
            r = probe(cfg)
            print(f"semantics {sem}: compiles and runs")
            return cfg, r
        except Exception as e:  # noqa: BLE001 - report and try the next
            print(f"semantics {sem} FAILED:\n{tail(e)}")
    return None, None


def parser(**defaults) -> argparse.ArgumentParser:
    """The options every Hopper device script takes."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--semantics", default="lane,warpgroup",
                   help="lowering semantics to try, in order")
    p.add_argument("--T", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--no-breakdown", action="store_true",
                   help="time the whole op only, not each kernel alone (the breakdown compiles "
                        "every variant of the walks: minutes at T = 32768)")
    p.add_argument("--profile", action="store_true",
                   help="also the device time of every kernel of each timed call, ours and "
                        "jla's (`*_kernels_us`, from a profiler trace)")
    p.set_defaults(**defaults)
    return p


def timing_inputs(T, vector_gate: bool):
    """q, k, v, g, do as the jla anchors were timed: bf16, H = 16, K = V = 128, B = max(1,
    16384 // T), g = log_sigmoid(N(0, 1)) / 16 in float32 ([B, T, H] or [B, T, H, K])."""
    B, H, K, V = max(1, 16384 // T), 16, 128, 128
    rng = np.random.default_rng(T)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)   # noqa: E731
    g_shape = (B, T, H, K) if vector_gate else (B, T, H)
    g = jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal(g_shape), f32)) / 16
    return n(B, T, H, K), n(B, T, H, K), n(B, T, H, V), g, n(B, T, H, V)


def time_decay_op(op, anchor, cfg, args, anchors, *, reps, profile=False, jla_row=None) -> dict:
    """The timing row of a decay-family kernel `op(q, k, v, g, ...)` on `timing_inputs`, with
    jax-linear-attention's `anchor` kind timed beside it on the same inputs when it is installed;
    `jla_row`: a row of this run at the same T whose jla timings are taken instead of timing jla
    again (one more config variant)."""
    q, k, v, g, do = args
    B, T, H, K = q.shape
    fwd, fwdbwd = fwd_and_fwdbwd(lambda q, k, v, g: op(
        q, k, v, g, scale=K**-0.5, initial_state=None, segment_ids=None, chunk_size=64,
        config=cfg)[0])
    row = {"T": T, "B": B, "H": H, "K": K, "V": v.shape[-1]}
    peer = None
    if jla_row is None:
        peer = jla_peer(anchor, lambda g: {"g": g})
    else:
        row.update({n: x for n, x in jla_row.items() if n.startswith("jla_run_")})
    return time_phases(row, fwd, fwdbwd, (q, k, v, g), do, anchors.get(T, {}), anchor,
                       reps=reps, label=f"T={T}", peer=peer, profile=profile)


def fwd_and_fwdbwd(call, n_grads: int = 3):
    """jit(call) and jit of the grads of sum(call(*a) * do) w.r.t. the first `n_grads` inputs
    (3: q, k, v, the anchors' protocol); the second takes `do` after them."""
    def loss(*a):
        return jnp.sum(call(*a[:-1]).astype(f32) * a[-1].astype(f32))
    return jax.jit(call), jax.jit(jax.grad(loss, argnums=tuple(range(n_grads))))


def jla_call(kind: str, gates):
    """x -> (o, S) of jax-linear-attention's `kind` (Mosaic GPU) on a check's inputs (q, k, v, S0,
    seg, and the gates `gates(x)` names; scale K^-1/2), or None where jla is not installed."""
    try:
        from jla.ops import linear_attention
    except ImportError:
        return None

    def call(x):
        return linear_attention(kind, x["q"], x["k"], x["v"], impl="mosaic_gpu",
                                scale=x["q"].shape[-1] ** -0.5, initial_state=x["S0"],
                                output_final_state=True, segment_ids=x["seg"], **gates(x))
    return call


def peer_checks(kind: str, gates, grid, at, run_check) -> list:
    """jax-linear-attention's `kind` (`jla_call`) through the checks `at` (indices) of a Hopper
    script's `grid`, on the same inputs (the scripts seed case i with 100 + i) and against the
    same reference: rows for the record (its gate gradient at strong decay beside ours), not
    checks of ours; [] where jla is not installed. run_check(name, cfg, B, T, H, K, V, *, gate,
    extras, seed, peer): the script's."""
    call = jla_call(kind, gates)
    if call is None:
        return []
    return run_grid([("jla: " + grid[i][0],) + tuple(grid[i][1:]) for i in at],
                    lambda j, c: run_check(c[0], None, *c[1:6], gate=c[6], extras=c[7],
                                           seed=100 + at[j], peer=call))


def jla_peer(kind: str, gates):
    """(fwd, fwdbwd) of jax-linear-attention's `kind` with the Mosaic GPU kernels, taking the same
    arguments as ours ((q, k, v, *rest), rest mapped to its keyword gates by `gates(*rest)`),
    the protocol of its anchors (grads w.r.t. q, k, v); None where jla is not installed."""
    try:
        from jla.ops import linear_attention
    except ImportError:
        return None
    return fwd_and_fwdbwd(lambda q, k, v, *rest: linear_attention(
        kind, q, k, v, impl="mosaic_gpu", **gates(*rest))[0])


def time_phases(row, fwd, fwdbwd, args, do, anchors, anchor, *, reps, label, key=str,
                peer=None, profile=False) -> dict:
    """Times fwd(*args) and fwdbwd(*args, do) into `row` (fields named by `key`): device time
    (back-to-back calls) and `sync` (each call blocked on the host, as the anchors were timed).
    With `peer` (jla's (fwd, fwdbwd) on the same arguments) it is timed the same two ways in
    this run, `jla_run_*`, its blocked calls interleaved with ours (`common.sync_ms`), and the
    ratio (jla / ours, sync; > 1: ours is faster) is taken against it; else against the anchor
    file's `jla.<anchor>.<phase>_ms` for the row's T. With `profile`, each timed call's kernels
    and their device microseconds, `<who><phase>_kernels_us` (`profile.kernel_times`), so ours
    and jla's programs can be compared kernel by kernel."""
    for phase, i in (("fwd", 0), ("fwdbwd", 1)):
        a = args if phase == "fwd" else (*args, do)
        ready = {}
        for who, f in (("", (fwd, fwdbwd)[i]), ("jla_run_", peer and peer[i])):
            if f is None:
                continue
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(f(*a))
                row[key(f"{who}{phase}_compile_s")] = round(time.perf_counter() - t0, 2)
                row[key(f"{who}{phase}_ms")] = common.median_ms(f, *a, reps=reps, inner=10)
                ready[who] = f
            except Exception as e:  # noqa: BLE001 - the row keeps the error, the script goes on
                row[key(f"{who}{phase}_error")] = tail(e, 8)
                print(f"{label} {who}{phase} FAILED:\n{tail(e)}")
        if ready:
            for who, ms in zip(ready, common.sync_ms(list(ready.values()), *a), strict=True):
                row[key(f"{who}{phase}_sync_ms")] = ms
        for who, f in ready.items() if profile else ():
            us = kernel_profile.kernel_times(lambda a, f=f: f(*a), a)
            row[key(f"{who}{phase}_kernels_us")] = {n: round(t, 2) for n, t in us.items()}
            print(f"{label} {who or 'ours '}{phase} kernels:\n"
                  f"{kernel_profile.format_times(us, top=16)}")
        jla = row.get(key(f"jla_run_{phase}_sync_ms")) or anchors.get(f"jla.{anchor}.{phase}_ms")
        if jla and key(f"{phase}_sync_ms") in row:
            row[key(f"jla_{phase}_ms")] = jla
            row[key(f"ratio_{phase}")] = jla / row[key(f"{phase}_sync_ms")]
    return row


def table(rows, title, key=str, label=lambda r: f"{r['T']:>6}") -> None:
    print(f"\n{title}\n{'T':>6} {'fwd ms':>8} {'sync':>8} {'jla':>7} {'ratio':>6} | "
          f"{'fwdbwd':>8} {'sync':>8} {'jla':>7} {'ratio':>6}")
    for r in rows:
        c = lambda s, r=r: f"{r.get(key(s), float('nan')):8.3f}"        # noqa: E731
        print(f"{label(r)} {c('fwd_ms')} {c('fwd_sync_ms')} {r.get(key('jla_fwd_ms'), 0):7.3f} "
              f"{r.get(key('ratio_fwd'), 0):6.2f} | {c('fwdbwd_ms')} {c('fwdbwd_sync_ms')} "
              f"{r.get(key('jla_fwdbwd_ms'), 0):7.3f} {r.get(key('ratio_fwdbwd'), 0):6.2f}")
        if "kernels_ms" in r:
            print("       kernels (device ms):", r["kernels_ms"])


def finish(name: str, rows, checks, t_start: float, **meta) -> int:
    """Prints the checks' count, writes benchmarks/results/<name>_<device>.json (and a copy under
    $OUT when set); 0 when every check passed."""
    n_fail = sum(not c["ok"] for c in checks)
    print(f"\nchecks: {len(checks) - n_fail} passed, {n_fail} failed; "
          f"{time.perf_counter() - t_start:.0f} s")
    path = common.write_json(common.device_file(name), rows, checks=checks, **meta)
    print("wrote", path)
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])
    return 0 if checks and n_fail == 0 else 1
