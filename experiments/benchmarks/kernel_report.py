"""What the compiler and the clock say about the delta rule's Mosaic GPU (Hopper) kernels, on the
device: where a kernel's time goes when the profiler's kernel total is all one has.

    python -m experiments.benchmarks.kernel_report [--T 2048] [--B 8] [--keep DIR] [--skip-sass]
    python -m experiments.benchmarks.kernel_report --op gla     # gla's (or simple_gla's) kernels

(a) Resources: each kernel of the gated rule's forward and backward (UT prep, forward walk with
    and without residuals, reverse walk, gradient kernel) compiled with MOSAIC_GPU_DUMP_TO: per
    kernel its registers, spill bytes and whether ptxas serialised its wgmmas (the ptxas log), and
    its SASS opcode counts (nvdisasm, or the PTX assembled by the `triton` wheel's ptxas; HGMMA:
    wgmma; MUFU: exp2 and friends; FFMA / FADD / FMUL / FSEL / ISETP...: CUDA-core work; LDS / STS:
    shared memory; LDL / STL: local memory, i.e. spills; BAR / SYNCS: barriers). With --keep, the
    PTX, SASS and ptxas files are copied (gzipped) there (the PTX assembles on any host with the
    ptxas of the `triton` wheel).
(b) Stage times: the UT prep and the forward walk (with and without residuals) and the reverse
    walk run with `HopperDeltaConfig.profile_dir`: each call writes a Chrome trace of the
    kernel's named scopes (`jax.named_scope` in `kernels/gpu/hopper/delta.py` and `delta_bwd.py`:
    prep: wait, kkt, doubling, newton, wu, store; walk: wait, mm1, elem, store_u, mm2, store_o;
    walk_rev: wait, mm1, store_du, mm2, store),
    per CTA and warpgroup. Per kernel and scope: ranges, mean and total us per warpgroup, and the
    share of the warpgroup's span (first to last event) they cover. The profiler adds a clock read
    and an SMEM store per event (~12 cycles, subtracted by jax's reader), so the times are of the
    instrumented kernel, close to the plain one.
With `--op gla` or `--op simple_gla`, (a) for every Mosaic GPU kernel of that op's forward and
backward (`impl="pallas:mosaic_gpu"`, bf16, the same shape), and (b) for the kernels whose bodies
have named scopes (gla's gates: wait, chunk, levels, store; gla's grad: wait, da, block, levels,
store), keyed by the scopes' common prefix.
Writes benchmarks/results/kernel_report_<device>.json (`kernel_report_<op>_<device>.json`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks import hopper_delta_gpu as hdg
from experiments.benchmarks.kernel_checks import tail
from experiments.benchmarks.triton_sass import nvidia_tool, opcode_counts
from linear_jax.kernels.configs import HopperChunkConfig, HopperDeltaConfig

REGS = re.compile(r"Used (\d+) registers")
TRACED = ("prep", "prep_with_T", "walk", "walk_residuals", "walk_rev")   # with named scopes
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
STACK = re.compile(r"(\d+) bytes stack frame")


# -- (a) registers, spills, SASS ------------------------------------------------------------------
def resources(dump: str, keep: str | None) -> dict:
    """Per dumped module: registers, spill bytes, stack, SASS opcode counts."""
    out: dict = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(dump, "*"))):
        base = os.path.basename(path)
        stem = base.split(".")[0]
        if base.endswith(".sass"):
            with open(path) as f:
                ops = opcode_counts(f.read())
            out[stem]["sass_total"] = sum(ops.values())
            out[stem]["sass"] = dict(ops.most_common(40))
        elif base.endswith(".ptxas") or "ptxas" in base:
            with open(path) as f:
                text = f.read()
            for key, rx in (("registers", REGS), ("stack_bytes", STACK)):
                m = rx.search(text)
                if m:
                    out[stem][key] = int(m.group(1))
            m = SPILL.search(text)
            if m:
                out[stem]["spill_store_bytes"], out[stem]["spill_load_bytes"] = map(
                    int, m.groups())
            # ptxas C7512: a wgmma waits for the one before (too few registers to overlap them)
            out[stem]["wgmma_serialized"] = "C7512" in text
        elif not base.endswith(".ptx"):
            continue
        if keep:
            os.makedirs(keep, exist_ok=True)
            with open(path, "rb") as src:
                with gzip.open(os.path.join(keep, base + ".gz"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    for path in sorted(glob.glob(os.path.join(dump, "*.ptx"))):
        stem = os.path.basename(path).split(".")[0]
        if "sass" not in out.get(stem, {}):
            ops = sass_from_ptx(path)
            if ops is not None:
                out[stem]["sass_total"] = sum(ops.values())
                out[stem]["sass"] = dict(ops.most_common(40))
    return dict(out)


def sass_from_ptx(ptx: str) -> collections.Counter | None:
    """SASS opcode counts of a PTX file assembled for sm_90a by the ptxas and nvdisasm of the
    `triton` wheel (a device without the CUDA toolkit's nvdisasm, or any host); None without it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        r = subprocess.run([nvidia_tool("ptxas"), "-arch=sm_90a", ptx, "-o", cubin],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"ptxas failed on {ptx}: {r.stdout[-400:]}{r.stderr[-400:]}")
            return None
        sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", cubin],
                              capture_output=True, text=True).stdout
    return opcode_counts(sass)


# -- (b) stage times from the in-kernel traces ----------------------------------------------------
def stage_times(trace_files: list[str]) -> dict:
    """Per scope: ranges per warpgroup, mean us, total us per warpgroup and share of its span,
    over every (CTA, warpgroup) trace of the kernel's call(s) whose scopes were recorded."""
    per = collections.defaultdict(lambda: collections.defaultdict(list))   # tid -> name -> [us]
    spans = {}
    for path in trace_files:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        stacks = collections.defaultdict(list)
        for e in events:
            tid = (path, e["tid"])
            lo, hi = spans.get(tid, (e["ts"], e["ts"]))
            spans[tid] = (min(lo, e["ts"]), max(hi, e["ts"]))
            if e["ph"] == "B":
                stacks[tid].append((e["name"], e["ts"]))
            elif stacks[tid]:
                name, t0 = stacks[tid].pop()
                per[tid][name].append(e["ts"] - t0)
    if not per:
        return {}
    out = {}
    names = sorted({n for d in per.values() for n in d})
    for n in names:
        counts = [len(d[n]) for d in per.values() if n in d]
        totals = [sum(d[n]) for d in per.values() if n in d]
        shares = [sum(d[n]) / max(spans[t][1] - spans[t][0], 1e-9) for t, d in per.items()
                  if n in d]
        allv = [v for d in per.values() for v in d.get(n, [])]
        out[n] = dict(ranges_per_wg=round(float(np.mean(counts)), 1),
                      mean_us=round(float(np.mean(allv)), 3),
                      total_us_per_wg=round(float(np.mean(totals)), 2),
                      share=round(float(np.mean(shares)), 3), warpgroups=len(counts))
    out["_span_us_per_wg"] = round(float(np.mean([b - a for a, b in spans.values()])), 2)
    return out


def dumped(calls, keep: str | None) -> tuple[dict, str | None]:
    """(resources of every Mosaic GPU module compiled by `calls`, the error text or None)."""
    dump = tempfile.mkdtemp(prefix="mgpu_dump_")
    os.environ["MOSAIC_GPU_DUMP_TO"] = dump            # read by the compiler at each compile
    try:
        for f, a in calls:
            jax.block_until_ready(f(*a))
        res, err = resources(dump, keep), None
        for mod, r in res.items():
            print(f"{mod:40s} regs {r.get('registers')} spill st/ld "
                  f"{r.get('spill_store_bytes')}/{r.get('spill_load_bytes')} "
                  f"stack {r.get('stack_bytes')} sass {r.get('sass_total')}: "
                  + " ".join(f"{k}={v}" for k, v in list(r.get("sass", {}).items())[:14]))
    except Exception as e:  # noqa: BLE001
        res, err = {}, tail(e, 8)
        print(f"resources FAILED:\n{tail(e)}")
    finally:
        os.environ.pop("MOSAIC_GPU_DUMP_TO", None)
        print("dump files:", sorted(os.listdir(dump))[:60])
    return res, err


def chunk_op_report(args, row) -> int:
    """(a) for the Mosaic GPU kernels of gla or simple_gla: forward, and forward + backward."""
    from linear_jax import ops

    B, T, H, D = args.B, args.T, args.H, args.D
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks[:3])
    gshape = (B, T, H, D) if args.op == "gla" else (B, T, H)
    g = -jax.nn.softplus(jax.random.normal(ks[3], gshape, jnp.float32)) / 8
    do = jax.random.normal(ks[4], (B, T, H, D), jnp.bfloat16)
    op = getattr(ops, args.op)

    def calls(cfg):
        def fwd(q, k, v, g):
            return op(q, k, v, g, impl="pallas:mosaic_gpu", config=cfg)[0]

        def loss(q, k, v, g, do):
            return jnp.sum(fwd(q, k, v, g).astype(jnp.float32) * do)

        return [(jax.jit(fwd), (q, k, v, g)),
                (jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (q, k, v, g, do))]

    cfg = HopperChunkConfig.default()
    row["op"] = args.op
    if not args.skip_sass:
        row["resources"], err = dumped(calls(cfg), args.keep)
        if err:
            row["resources_error"] = err
    # (b) per kernel whose body has named scopes (gla's gates and grad): one trace file a call
    prof = tempfile.mkdtemp(prefix="mgpu_trace_")
    stages = {}
    try:
        for f, a in calls(dataclasses.replace(cfg, profile_dir=prof)):
            jax.block_until_ready(f(*a))
            jax.effects_barrier()                       # the traces are written by callbacks
        for path in sorted(os.listdir(prof)):
            st = stage_times([os.path.join(prof, path)])
            names = sorted(n for n in st if not n.startswith("_"))
            if names:
                kernel = os.path.commonprefix(names).rstrip("_") or names[0]
                stages.setdefault(kernel, st)
        for kernel, st in stages.items():
            print(f"-- {kernel}")
            for scope, v in st.items():
                print(f"   {scope:14s} {v}")
    except Exception as e:  # noqa: BLE001
        row["stages_error"] = tail(e, 8)
        print(f"stage times FAILED:\n{tail(e)}")
    row["stages"] = stages
    path = common.write_json(common.device_file(f"kernel_report_{args.op}"), [row])
    print("wrote", path)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--keep", default=None, help="copy the SASS / ptxas dumps (gzipped) here")
    p.add_argument("--skip-sass", action="store_true")
    p.add_argument("--op", default="delta", choices=("delta", "gla", "simple_gla"))
    args = p.parse_args(argv)
    row = dict(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D)
    if args.op != "delta":
        return chunk_op_report(args, row)
    x = hdg.inputs(args.B, args.T, args.H, args.D, args.D, gate="normal", dtype=jnp.bfloat16,
                   seed=0, extras=False)
    cfg = HopperDeltaConfig.default()
    if not args.skip_sass:
        row["resources"], err = dumped([(f, a) for _, f, a in hdg.kernel_calls(cfg, x)[0]],
                                       args.keep)
        if err:
            row["resources_error"] = err
    prof = tempfile.mkdtemp(prefix="mgpu_trace_")
    pcfg = dataclasses.replace(cfg, profile_dir=prof)
    stages = {}
    try:
        for name, f, a in hdg.kernel_calls(pcfg, x, setup_cfg=cfg)[0]:
            if name not in TRACED:
                continue
            before = set(os.listdir(prof))
            jax.block_until_ready(f(*a))
            jax.effects_barrier()                       # the trace is written by a callback
            new = sorted(set(os.listdir(prof)) - before)
            stages[name] = stage_times([os.path.join(prof, f) for f in new])
            print(f"-- {name} ({len(new)} trace files)")
            for scope, s in stages[name].items():
                print(f"   {scope:12s} {s}")
    except Exception as e:  # noqa: BLE001
        row["stages_error"] = tail(e, 8)
        print(f"stage times FAILED:\n{tail(e)}")
    row["stages"] = stages
    path = common.write_json(common.device_file("kernel_report"), [row],
                             config=dataclasses.asdict(cfg))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
