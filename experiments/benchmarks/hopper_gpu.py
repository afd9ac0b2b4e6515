"""The Hopper (Mosaic GPU) kernels on the device: correctness, then timings against the anchors,
for named config variants side by side.

    python -m experiments.benchmarks.hopper_gpu [--variants default,run1,serial,approx]
        [--semantics lane|warpgroup] [--T 2048 8192 32768] [--breakdown default,run1@2048]

(a) Checks, for every variant: the kernel's output, final state and gradients (q, k, v, g, initial
    state) against the float32 XLA chunk form run on float32 copies of the same inputs, by
    relative norm error, with initial states and packed documents (boundaries inside chunks and at
    chunk starts). The default variant runs the whole quick grid (T = 100, 2048 with K = V = 128,
    linear attention, strong decay g down to -20 per step: no NaN, exact gate gradient, and
    T = 8192 with documents and an initial state, where the two-level walk's pieces cross
    documents); the other variants T = 100 and T = 8192 (plus strong decay where the exponentials
    change). Float32 inputs are refused (ValueError: checked).
(b) Timings: bf16, H = 16, K = V = 128, B = max(1, 16384 // T) (as probe_jla.py), T in {2048, 8192,
    32768}: forward and forward + backward (grad of sum(o * do) w.r.t. q, k, v, the anchors'
    protocol; every input a jit argument), as the median of back-to-back calls (device time) and
    of calls each blocked on the host (`sync`, how the jla anchors were timed; jla's interleaved
    with ours, `common.sync_ms`); jla timed the same
    two ways in this run on the same inputs where its wheel is installed (`jla_run_*`), else the
    anchor file's number, and the ratio (jla / ours sync, > 1 is faster). A variant whose
    resolved config equals an earlier one at that T (e.g. pieces1 where B H fills the SMs) is not
    timed again. Then the device ms of each kernel
    alone (`--breakdown` variants): the state pass and output pass of the forward walk, the same
    with states written, the reverse walk's two passes, the gradient kernel (also with its work
    items in the other order). `--profile`: every kernel of the first variant's timed calls and
    of jla's, from a profiler trace.
(c) One table (T x variant), and benchmarks/results/hopper_gpu_<device>.json.

A variant or kernel that fails to compile or run prints the last lines of its traceback and the
rest goes on. The lowering semantics (Lane, jax 0.10's default, or Warpgroup, 0.11's) is tried in
the order given on the default variant; the first that compiles is used for everything after
(if none does, the variants still run under the first: `serial` does no work during the
wgmmas, `run1` has run 1's structure).
Expected wall time with the default arguments: ~4.5 minutes, mostly compiles (printed first).
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
from linear_jax.kernels.configs import HopperChunkConfig, multiprocessors
from linear_jax.kernels.gpu.hopper import common as hcommon
from linear_jax.kernels.gpu.hopper import decay as hopper_decay
from linear_jax.kernels.gpu.hopper import decay_grad

TOL = 1e-2
f32 = jnp.float32

# name -> (config overrides, the checks of GRID it runs: None for all)
VARIANTS = {
    "default": ({}, None),
    "run1": (dict(pieces=1, gates="xla", grad_items="tile"), ("T8192",)),  # run 1's program
    "pieces1": (dict(pieces=1), ("T8192",)),                     # no two-level walk
    "approx": (dict(approx_math=True), ("T8192", "strong")),     # ex2.approx exponentials
    "xla_gates": (dict(gates="xla"), ("T100", "T8192")),         # gate rows by XLA kernels
    "kernel_gates": (dict(gates="kernel"), ("T100", "T2048", "T8192", "strong")),  # in-kernel
    "grad_tile": (dict(grad_items="tile"), ("T100", "T8192")),   # grad item per key tile
    "serial": (dict(overlap=False), ("T8192",)),                 # no work during the wgmmas
    "chunk_order": (dict(item_order="chunks"), ("T8192",)),     # grad items chunk-fastest
}

# id: (name, B, T, H, K, V, gate, extras (initial state + packed documents))
GRID = {"T100": ("gated+docs+h0", 2, 100, 2, 64, 64, "normal", True),
        "T8192": ("gated+docs+h0", 1, 8192, 4, 128, 128, "normal", True),
        "T2048": ("gated+docs+h0", 2, 2048, 4, 128, 128, "normal", True),
        "linear": ("linear attention", 2, 2048, 4, 64, 64, None, False),
        "strong": ("strong decay", 2, 2048, 4, 128, 128, "strong", True),
        # --full only
        "T100-128": ("gated+docs+h0", 2, 100, 2, 128, 128, "normal", True),
        "linear8192": ("linear attention+docs+h0", 1, 8192, 4, 64, 64, None, True),
        "padded": ("gated, K=100 V=48 (padded)", 2, 300, 2, 100, 48, "normal", True),
        # T2048 again with other inputs (the seed follows the id's place here)
        "T2048-b": ("gated+docs+h0", 2, 2048, 4, 128, 128, "normal", True),
        "T2048-c": ("gated+docs+h0", 2, 2048, 4, 128, 128, "normal", True)}
QUICK = ("T100", "T8192", "T2048", "T2048-b", "T2048-c", "linear", "strong")


def inputs(B, T, H, K, V, *, gate, dtype, seed, extras):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)   # noqa: E731
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


_REFERENCE: dict = {}


def run_check(name, cfg, B, T, H, K, V, *, gate, extras, seed):
    x = inputs(B, T, H, K, V, gate=gate, dtype=jnp.bfloat16, seed=seed, extras=extras)
    names = ("q", "k", "v") + (("g",) if x["g"] is not None else ()) + \
        (("S0",) if x["S0"] is not None else ())

    def kern(x):
        return hopper_decay.simple_gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5,
                                       initial_state=x["S0"], segment_ids=x["seg"],
                                       chunk_size=64, config=cfg)

    def ref(x):
        return ops.simple_gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5,
                              initial_state=x["S0"], segment_ids=x["seg"], impl="chunk")

    key = (name, B, T, H, K, V, gate, extras, seed)
    if key not in _REFERENCE:                     # shared by the variants (same inputs)
        xf = kc.as_float32(x)
        out = jax.jit(kc.loss_and_grads(ref, names))(xf, *[xf[n] for n in names])
        _REFERENCE[key] = lambda *_: out
    return kc.check(x, names, (jax.jit(kern), jax.jit(kc.loss_and_grads(kern, names))),
                    _REFERENCE[key], tol=TOL, check=name, T=T, K=K, V=V, B=B, H=H, gate=gate,
                    extras=extras)


def checks_for(variant, full):
    """[(id, check)] of a variant: the quick grid (or all with --full) for the default."""
    ids = VARIANTS[variant][1] or (tuple(GRID) if full else QUICK)
    return [(i, GRID[i]) for i in ids]


def estimate_s(variants, Ts, full) -> int:
    """Rough wall seconds on the H200 (compiles dominate: ~9 s per variant per T, ~9 s per
    check, ~9 s per breakdown, ~45 s of startup, probe and references)."""
    n_checks = sum(len(checks_for(n, full)) for n in variants)
    n_timed = sum(len(Ts) - (n == "pieces1" and 2048 in Ts) for n in variants)
    return 45 + 9 * (n_timed + n_checks + len(Ts) + 1)


def kernel_breakdown(cfg, P, args, *, reps):
    """Device ms of each kernel alone (inputs prepared outside the timed call)."""
    q, k, v, g, do = args
    B, T, H, K = q.shape
    C, scale = cfg.chunk, K**-0.5
    if cfg.gates == "kernel":
        rows, names = hcommon.raw_gate_rows(g, None, C=C, H=H)
    else:
        rows, names = hcommon.gate_rows(g, None, scale=scale, C=C, H=H)
    kw = dict(names=names, scale=scale, cfg=cfg)
    fw = dict(read_row="gq", write_row="gk", reverse=False, **kw)
    rv = dict(read_row="gk", write_row="gq", reverse=True, **kw)
    out, timed = {}, lambda name, f, *a: out.__setitem__(   # noqa: E731
        name, common.median_ms(f, *a, reps=reps, inner=10))
    try:
        s_in = ds_in = None
        if P > 1:
            f = jax.jit(lambda y, z, r: hopper_decay.walk(None, y, z, r, None, pieces=P,
                                                          emit="state", **fw))
            timed("walk_state", f, k, v, rows)
            s_in = hcommon.piece_states(*f(k, v, rows), None, reverse=False)
            f = jax.jit(lambda y, z, r: hopper_decay.walk(None, y, z, r, None, pieces=P,
                                                          emit="state", **rv))
            timed("walk_rev_state", f, q, do, rows)
            ds_in = hcommon.piece_states(*f(q, do, rows), None, reverse=True)
        f = jax.jit(lambda x, y, z, r, s: hopper_decay.walk(x, y, z, r, s, pieces=P, **fw))
        timed("walk_fwd", f, q, k, v, rows, s_in)
        f = jax.jit(lambda x, y, z, r, s: hopper_decay.walk(x, y, z, r, s, pieces=P,
                                                            residuals=True, **fw))
        states = f(q, k, v, rows, s_in)[2]
        timed("walk_fwd_states", f, q, k, v, rows, s_in)
        f = jax.jit(lambda x, y, z, r, s: hopper_decay.walk(x, y, z, r, s, pieces=P,
                                                            residuals=True, final=False, **rv))
        dstates = f(k, q, do, rows, ds_in)[2]
        timed("walk_rev", f, k, q, do, rows, ds_in)
        f = jax.jit(lambda *a: decay_grad.grad(*a, **kw))
        timed("grad", f, q, k, v, do, rows, states, dstates)
        other = "chunks" if cfg.item_order == "heads" else "heads"    # the items' other order
        kw_other = dict(kw, cfg=dataclasses.replace(cfg, item_order=other))
        f = jax.jit(lambda *a: decay_grad.grad(*a, **kw_other))
        timed(f"grad_{other}", f, q, k, v, do, rows, states, dstates)
    except Exception as e:  # noqa: BLE001
        out["error"] = tail(e, 8)
        print(f"kernel breakdown FAILED:\n{tail(e)}")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def save(dev, rows, checks, names, base) -> str:
    """The JSON so far (written after the checks and after every T: a run cut short keeps it)."""
    slug = dev.device_kind.replace(" ", "_")
    return common.write_json(
        f"hopper_gpu_{slug}.json", rows, checks=checks,
        variants={n: VARIANTS[n][0] for n in names},
        config=dataclasses.asdict(base) if base else None, tolerance=TOL,
        shapes="bf16, H=16, K=V=128, B=max(1, 16384 // T); checks bf16 vs float32 chunk form "
               "on the same values")


def main(argv=None) -> int:
    p = kc.parser()
    p.add_argument("--variants", default="default,run1,serial,approx",
                   help=f"config variants to check and time, of {sorted(VARIANTS)}")
    p.add_argument("--breakdown", default="default,run1@2048",
                   help="variants whose kernels are timed one by one: name (every T) or name@T")
    p.add_argument("--full", action="store_true", help="the longer check grid for the default")
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    sms = multiprocessors(dev)
    print("device", dev.device_kind, "jax", jax.__version__, "SMs", sms)
    t_start = time.perf_counter()
    names = [n for n in a.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    print(f"expected wall time ~{estimate_s(names, a.T, a.full)} s")
    order = a.semantics.split(",")
    probe = ("probe", 1, 128, 2, 128, 128)
    base, _ = kc.pick_semantics(order, HopperChunkConfig.default(dev), lambda cfg: run_check(
        probe[0], cfg, *probe[1:], gate="normal", extras=True, seed=0))
    if base is None:                              # the variants may still compile: go on
        base = dataclasses.replace(HopperChunkConfig.default(dev), semantics=order[0])
        print(f"the default compiled under no semantics: the variants run under {order[0]}")
    checks, rows = [], []
    cfgs = {n: dataclasses.replace(base, **VARIANTS[n][0]) for n in names}
    for n, cfg in cfgs.items():
        print(f"variant {n}: {cfg}")
        for cid, (name, B, T, H, K, V, gate, extras) in ([] if a.skip_checks else
                                                         checks_for(n, a.full)):
            seed = 100 + list(GRID).index(cid)        # the same inputs for every variant
            r = kc.run_grid([(name, B, T, H, K, V, gate, extras)], lambda i, c, cfg=cfg: run_check(
                c[0], cfg, *c[1:6], gate=c[6], extras=c[7], seed=seed))[0]
            r["variant"] = n
            checks.append(r)
    x = jnp.zeros((1, 64, 1, 64), f32)
    checks.append(kc.float32_refused(lambda: hopper_decay.simple_gla(
        x, x, x, None, scale=1.0, initial_state=None, segment_ids=None, chunk_size=64)))

    save(dev, rows, checks, names, base)
    anchor_path, anchors = anchor_files.anchors_for(dev.device_kind)
    print("anchors", anchor_path)
    breakdown = set(a.breakdown.split(","))
    for T in a.T:
        args = kc.timing_inputs(T, vector_gate=False)
        B, H = args[0].shape[0], args[0].shape[2]
        seen = {}
        for n, cfg in cfgs.items():
            P = cfg.pieces_for(B * H, T // cfg.chunk, sms)
            resolved = dataclasses.replace(cfg, pieces=P)
            if resolved in seen:
                print(f"T={T} {n}: the same program as {seen[resolved]} (P={P})")
                continue
            seen[resolved] = n
            first = next((r for r in rows if r["T"] == T), None)   # jla is timed once a T
            row = kc.time_decay_op(hopper_decay.simple_gla, "simple_gla", cfg, args, anchors,
                                   reps=a.reps, profile=a.profile and first is None,
                                   jla_row=first)
            row.update(variant=n, pieces=P)
            if n in breakdown or f"{n}@{T}" in breakdown:
                row["kernels_ms"] = kernel_breakdown(cfg, P, args, reps=a.reps)
            rows.append(row)
            print(row, flush=True)
        save(dev, rows, checks, names, base)
    kc.table(rows, "simple_gla", label=lambda r: f"{r['T']:>6} {r['variant']:>10} P={r['pieces']}")
    n_fail = sum(not c["ok"] for c in checks)
    print(f"\nchecks: {len(checks) - n_fail} passed, {n_fail} failed; "
          f"{time.perf_counter() - t_start:.0f} s")
    print("wrote", save(dev, rows, checks, names, base))
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
