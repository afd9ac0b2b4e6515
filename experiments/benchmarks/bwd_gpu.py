"""The chunk-family backward on the GPU, side by side: the kernels of an older commit, those of the
first exact version, and each named variant of the current ones (TritonChunkConfig fields).

    python -m experiments.benchmarks.bwd_gpu [--T 2048 8192] [--variants default,dot,...]
        [--old 7c716e1] [--exact1 658a80f] [--reps 20] [--no-check] [--serial]

Checks (current kernels, each variant on the ops it touches; references computed once, checks
run in a thread pool): outputs, final states and the gradients of q, k, v, g, beta and the initial
state against the float32 recurrence (XLA; the chunk form's gla dq / dk are wrong at strong gates,
see `_reference_grads`): bf16 B=1 T=2048 H=2 K=V=128 with packed documents and an initial state
(pass: relative error <= 2e-2), and float32 T=256 with every gate strong (uniform in [-25, -15];
pass <= 1e-5, dg included). Timings: fwd+bwd (grad of sum(o * do) w.r.t. q, k, v, g, beta; every
input a jit argument) of simple_gla, gla and gated_delta_rule, bf16, H=16, K=V=128, B*T=16384,
gates log_sigmoid(N(0,1)) / 16 (as `ops_gpu.inputs`), median of `reps` x 10 queued calls (device
time), at T=2048 for every kernel set and at the later T for old / exact1 / default; a variant
named in AFFECTS runs only the ops it changes. The older kernel trees come from `old_kernels.py`
(runs/trees/<commit> if prepared and carried, else `git archive`); a tree that fails to load or to
run is recorded as an error row and the rest goes on. Compiles run in the thread pool (--serial:
one at a time). Prints one table and writes benchmarks/results/bwd_gpu_<device>.json; exit status
1 if a check fails. --smoke: tiny shapes, for a CPU (interpret mode) run of the script itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

# name -> TritonChunkConfig overrides of the current kernels, and the ops each one changes
VARIANTS = {
    "default": {},
    # the first exact version's span math (0/1 products, masked [C, C] sums; GLA's per-row routes
    # in the inter-chunk kernel, the diagonal loop) inside today's kernel structure
    "dot": dict(spans="dot", gla_bwd="dots", gla_diag="loop"),
    "loop": dict(gla_diag="loop"),                          # GLA diagonal as c steps
    "ik16w4": dict(block_k_intra=16),                       # GLA intra backward tiles
    "ik32w8": dict(block_k_intra=32, warps_intra_bwd=8),
    "ik64w4": dict(block_k_intra=64),
    # the structure before the exact backward (session 18, kernels/gpu/NOTES.md issue 16): GLA's
    # per-row terms routed in the inter-chunk kernel into one dg part (one float32 [B, T, H, K]
    # fewer written and read), dv inside the one value loop, and both with the intra kernel's
    # pre-exact tiles (all of K a program, the loop diagonal)
    "fold": dict(gla_bwd="fold"),                           # the default since session 19
    "rows": dict(gla_bwd="rows"),                           # the default of session 18
    "dv1": dict(dv_pass="loop"),
    "fold_dv1": dict(gla_bwd="fold", dv_pass="loop"),
    "old_tiles": dict(gla_bwd="fold", dv_pass="loop", gla_diag="loop", block_k_intra=128),
}
AFFECTS = {"default": None, "dot": None, "loop": ("gla",), "ik16w4": ("gla",),
           "ik32w8": ("gla",), "ik64w4": ("gla",), "fold": ("gla",), "rows": ("gla",),
           "dv1": ("simple_gla", "gla"), "fold_dv1": ("gla",), "old_tiles": ("gla",)}
OPS = ("simple_gla", "gla", "gated_delta_rule")
H_BENCH, D, TOKENS = 16, 128, 16384
CHECK_T = (2048, 256)             # bf16 with documents, float32 strong gates


def _entry(mods, op):
    return mods["delta"].delta if "delta" in op else mods["decay"].decay


def make_call(entry, op, config, chunk=64):
    """(x dict) -> (o, S) through a kernel entry (scale K^-0.5)."""
    def call(x):
        kw = dict(scale=x["q"].shape[-1] ** -0.5, initial_state=x.get("S0"),
                  segment_ids=x.get("seg"), chunk_size=chunk)
        if config is not None:
            kw["config"] = config
        if "delta" in op:
            return entry(x["q"], x["k"], x["v"], x["g"], x["beta"], **kw)
        return entry(x["q"], x["k"], x["v"], x["g"], **kw)
    return call


def reference(op, x, impl):
    from linear_jax import ops
    f32 = {n: (a.astype(jnp.float32) if n != "seg" else a) for n, a in x.items()}
    kw = dict(initial_state=f32.get("S0"), segment_ids=f32.get("seg"), chunk_size=64,
              impl=impl)
    if op == "gated_delta_rule":
        return ops.gated_delta_rule(f32["q"], f32["k"], f32["v"], f32["g"], f32["beta"], **kw)
    return getattr(ops, op)(f32["q"], f32["k"], f32["v"], f32["g"], **kw)


def check_inputs(op, dtype, T, strong, seed=0, B=1, H=2):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    x = dict(q=f(B, T, H, D), k=f(B, T, H, D), v=f(B, T, H, D),
             S0=jnp.asarray(rng.standard_normal((B, H, D, D)), jnp.float32))
    gshape = (B, T, H, D) if op == "gla" else (B, T, H)
    g = rng.uniform(-25, -15, gshape) if strong else -np.logaddexp(0, -rng.uniform(-4, 4, gshape))
    x["g"] = jnp.asarray(g, jnp.float32)
    if "delta" in op:
        kf = x["k"].astype(jnp.float32)
        x["k"] = (kf / jnp.linalg.norm(kf, axis=-1, keepdims=True)).astype(dtype)
        x["beta"] = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, T, H)))), dtype)
    if not strong:
        ids = np.cumsum(rng.uniform(size=(B, T)) < 1 / 300, axis=1)
        x["seg"] = jnp.asarray(ids % 3, jnp.int32)
    return x


def loss_grad(call, x, do, dS):
    names = [n for n in x if n != "seg"]

    def loss(d):
        o, S = call(dict(x, **d))
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), {n: x[n] for n in names}


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


_REFS: dict = {}
_REFS_LOCK = threading.Lock()


def _reference_grads(op, case, x, do, dS):
    """The float32 recurrence's outputs and gradients for one (op, case), computed once."""
    key = (op, case)
    with _REFS_LOCK:
        if key not in _REFS:
            _REFS[key] = threading.Event()
            mine = True
        else:
            mine = False
    if mine:
        # the float32 recurrence, not the chunk form: the XLA chunk form's gla dq, dk are off at
        # strong gates (relative errors 0.8-1.0 at T=64 on a CPU, the kernels 1.4e-7), and with
        # documents at T=128 it crashed jaxlib 0.10.2's CPU backend (segfault)
        fr, dr = loss_grad(lambda y: reference(op, y, "recurrent"), x, do, dS)
        (_, out), rg = fr({n: v.astype(jnp.float32) for n, v in dr.items()})
        _REFS[key + ("value",)] = jax.block_until_ready((out, rg))
        _REFS[key].set()
    _REFS[key].wait()
    return _REFS[key + ("value",)]


def check(op, call, case):
    """Worst relative error over outputs and gradients, and dg's, for one check case."""
    dtype, T, strong, tol = case
    x = check_inputs(op, dtype, T, strong)
    rng = np.random.default_rng(1)
    do = jnp.asarray(rng.standard_normal(x["v"].shape), jnp.float32)
    dS = jnp.asarray(rng.standard_normal(x["S0"].shape), jnp.float32)
    f, d = loss_grad(call, x, do, dS)
    (_, (o, S)), gr = f(d)
    (ro, rS), rg = _reference_grads(op, case, x, do, dS)
    errs = {"o": rel(o, ro), "S": rel(S, rS)}
    errs.update({f"d{n}": rel(gr[n], rg[n]) for n in gr})
    worst = max(errs, key=errs.get)
    return dict(worst=worst, err=errs[worst], dg=errs.get("dg"), ok=errs[worst] <= tol)


def bench_inputs(op, T):
    from experiments.benchmarks.ops_gpu import inputs
    gate = {"simple_gla": "scalar", "gla": "vector", "gated_delta_rule": "gated_delta"}[op]
    x, do = inputs(max(1, TOKENS // T), T, H_BENCH, D, gate)
    return x, do


def fwd_bwd_fn(call, op):
    names = ("q", "k", "v", "g") + (("beta",) if "delta" in op else ())

    def f(x, do):
        def loss(d):
            o, _ = call(dict(x, **d))
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
        return jax.grad(loss)({n: x[n] for n in names})

    return jax.jit(f)


def device_ms(compiled, args, reps):
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(10):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / 10)
    return 1e3 * float(np.median(times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, nargs="*", default=[2048, 8192],
                   help="timed lengths; none: the checks alone")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--old", default="7c716e1", help="kernels before the exact gate gradients")
    p.add_argument("--exact1", default="658a80f", help="the first exact version ('' to skip)")
    p.add_argument("--ops", nargs="+", default=list(OPS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--serial", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (CPU interpret mode: the script's own test)")
    a = p.parse_args()
    global H_BENCH, D, TOKENS, CHECK_T
    if a.smoke:
        H_BENCH, D, TOKENS, CHECK_T = 2, 32, 128, (128, 64)
    from experiments.benchmarks import common, old_kernels
    from linear_jax.kernels.configs import TritonChunkConfig
    from linear_jax.kernels.gpu import decay, delta
    t_start = time.perf_counter()
    sets = {}                                   # tag -> (modules, config or None)
    rows, errors = [], []
    for tag, commit in (("old", a.old), ("exact1", a.exact1)):
        if not commit:
            continue
        try:
            sets[tag] = (old_kernels.load(commit), None)
        except Exception as e:  # noqa: BLE001 - recorded, the rest goes on
            errors.append(dict(tag=tag, stage="load", error=repr(e)))
            print(f"[{tag}] could not load {commit}: {e!r}", flush=True)
    names = a.variants.split(",")
    for n in names:
        sets[n] = ({"decay": decay, "delta": delta}, TritonChunkConfig(**VARIANTS[n]))
    applies = lambda tag, op: tag in ("old", "exact1") or AFFECTS.get(tag) is None or \
        op in AFFECTS[tag]

    # ---- checks --------------------------------------------------------------------------------
    checks = []
    pool = concurrent.futures.ThreadPoolExecutor(1 if a.serial else 8)
    if not a.no_check:
        cases = [(jnp.bfloat16, CHECK_T[0], False, 2e-2), (jnp.float32, CHECK_T[1], True, 1e-5)]
        jobs = [(n, op, case) for n in names for op in a.ops if applies(n, op) for case in cases]

        def run_check(job):
            n, op, case = job
            mods, cfg = sets[n]
            try:
                return check(op, make_call(_entry(mods, op), op, cfg), case)
            except Exception as e:  # noqa: BLE001 - recorded as a failed check
                traceback.print_exc()
                return dict(worst="-", err=float("nan"), dg=None, ok=False, error=repr(e))

        for (n, op, case), r in zip(jobs, pool.map(run_check, jobs), strict=True):
            label = f"{jnp.dtype(case[0]).name} T={case[1]}" + (" strong" if case[2]
                                                                 else " docs+S0")
            checks.append(dict(tag=n, op=op, case=label, **r))
            dg = "-" if r["dg"] is None else f"{r['dg']:.1e}"
            print(f"check {n:8s} {op:17s} {label:22s} worst {r['worst']:5s} {r['err']:.2e} "
                  f"dg {dg} {'ok' if r['ok'] else 'FAIL'}", flush=True)
        print(f"checks done at {time.perf_counter() - t_start:.0f} s", flush=True)

    # ---- timings: compile everything (threads), then time one at a time -----------------------
    cells = []
    for T in a.T:
        for op in a.ops:
            x, do = bench_inputs(op, T)
            for tag, (mods, cfg) in sets.items():
                if not applies(tag, op) or (T != a.T[0] and tag not in ("old", "exact1",
                                                                         "default")):
                    continue
                cells.append(dict(tag=tag, op=op, T=T, B=max(1, TOKENS // T),
                                  fn=fwd_bwd_fn(make_call(_entry(mods, op), op, cfg), op),
                                  args=(x, do)))

    def compile_cell(c):
        t0 = time.perf_counter()
        c["exe"] = c["fn"].lower(*c["args"]).compile()
        c["compile_s"] = time.perf_counter() - t0
        return c

    futs = {pool.submit(compile_cell, c): c for c in cells}
    for fut in concurrent.futures.as_completed(futs):
        c = futs[fut]
        if fut.exception() is not None:
            c["error"] = repr(fut.exception())
    print(f"compiled {len(cells)} cells at {time.perf_counter() - t_start:.0f} s", flush=True)
    for c in cells:
        row = {k: c[k] for k in ("tag", "op", "T", "B")}
        if "error" in c:
            row["error"] = c["error"]
        else:
            try:
                row["compile_s"] = c["compile_s"]
                row["fwdbwd_ms"] = device_ms(c["exe"], c["args"], a.reps)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)
        rows.append(row)

    # ---- table ---------------------------------------------------------------------------------
    tags = list(sets)
    print(f"\nfwd+bwd ms (bf16, H={H_BENCH}, K=V={D}, B*T={TOKENS})")
    print(f"{'op':17s} {'T':>6s} " + " ".join(f"{t:>9s}" for t in tags))
    for T in a.T:
        for op in a.ops:
            cell = lambda t: next((r for r in rows if r["tag"] == t and r["op"] == op
                                   and r["T"] == T), None)
            fmt = lambda r: "" if r is None else ("err" if "error" in r else
                                                  f"{r['fwdbwd_ms']:.3f}")
            print(f"{op:17s} {T:6d} " + " ".join(f"{fmt(cell(t)):>9s}" for t in tags))
    for r in rows:
        if "error" in r:
            print(f"error {r['tag']} {r['op']} T={r['T']}: {r['error'][:300]}")
    dev = jax.devices()[0].device_kind.replace(" ", "_")
    path = common.write_json(
        f"bwd_gpu_{dev}{'_smoke' if a.smoke else ''}.json", rows, checks=checks, errors=errors,
        variants=VARIANTS,
        commits=dict(old=a.old, exact1=a.exact1),
        what="fwd+bwd of the chunk-family kernels: old (before exact gates), exact1 (first "
             "exact version) and the current variants; checks vs the float32 chunk form")
    print(f"wrote {path} in {time.perf_counter() - t_start:.0f} s")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
