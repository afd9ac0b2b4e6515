"""GPU timings of the decay-family ops: XLA chunk form vs the Pallas kernels, against the anchors.

    python -m experiments.benchmarks.ops_gpu [--T 2048 8192 32768] [--reps 50] [--sweep]

bf16, H=16, K=V=128, B*T=16384 tokens. For each op with a kernel and each impl: compile seconds,
median ms of the forward and of forward+backward (grad of sum(o * do) w.r.t. q, k, v, g, beta), the
compiled program's memory (arguments + outputs + temporaries), achieved TB/s and TFLOP/s against the
measured ceilings, the floor of the shape, and the ratio to flash-linear-attention and to
jax-linear-attention (benchmarks/anchors/<device>-anchors.json, measured on this device kind by
`anchors.py`, else the H100 file; ratio = anchor ms / our ms, > 1 is faster). Each time is
measured the way its anchor was: `fwd_ms` / `fwdbwd_ms` with calls queued
back to back (device time, as do_bench timed fla), `*_sync_ms` each call waited for on the host
(as jla was timed); the ratio to fla uses the first, to jla the second. --sweep also times a few
tilings of the Triton kernels (`TritonChunkConfig` fields over its device default, passed as
`config=`; impl "pallas:triton", recorded under impl "pallas[...]").
Writes benchmarks/results/ops_gpu_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from experiments.benchmarks import anchors as anchor_files
from experiments.benchmarks import common, profile
from linear_jax import ops
from linear_jax.kernels.configs import TritonChunkConfig

OPS = {  # name: (call(x, impl, config) -> o, gate, anchor names in fla / jla)
    "simple_gla": (lambda x, i, c: ops.simple_gla(x["q"], x["k"], x["v"], x["g"], impl=i,
                                                  config=c)[0],
                   "scalar", ("simple_gla", "simple_gla")),
    "gla": (lambda x, i, c: ops.gla(x["q"], x["k"], x["v"], x["g"], impl=i, config=c)[0],
            "vector", ("gla", "gla")),
    "delta_rule": (lambda x, i, c: ops.delta_rule(x["q"], x["k"], x["v"], x["beta"], impl=i,
                                                  config=c)[0],
                   "delta", ("delta_rule", "deltanet")),
    "gated_delta_rule": (lambda x, i, c: ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"],
                                                             x["beta"], impl=i, config=c)[0],
                         "gated_delta", ("gated_delta_rule", "gated_deltanet")),
    # not in the default list (no anchor): `--ops kda --impls chunk pallas:triton` times its
    # Triton kernels against the chunk form, which "auto" waits for
    "kda": (lambda x, i, c: ops.kda(x["q"], x["k"], x["v"], x["g"], x["beta"], impl=i,
                                    config=c)[0],
            "vector_delta", ("kda", "kda")),
}
DEFAULT_OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule")
SWEEP = {"min_programs0": dict(min_programs=0), "bwd_k64": dict(block_k_bwd=64),
         "bv32": dict(block_v=32), "bk32bv32": dict(block_k=32, block_v=32),
         "out128": dict(block_v_out=128), "out32": dict(block_v_out=32), "bwd4": dict(warps_bwd=4),
         "stages3": dict(stages_state=3, stages_out=3), "intra_w1": dict(warps_intra=1),
         "intra_w2": dict(warps_intra=2), "intra_w8": dict(warps_intra=8),
         "sub32": dict(sub_chunk=32), "fused": dict(fused_fwd=True),
         "two_pass": dict(fused_fwd=False), "fused_w8": dict(fused_fwd=True, warps_fused=8),
         "fused_bv32": dict(fused_fwd=True, block_v_fused=32),
         "fused_s1": dict(fused_fwd=True, stages_fused=1)}
GLA_ONLY = ("warps_intra",)   # tilings of a kernel only gla runs


def ceilings(n_copy=1 << 28, n_mm=8192):
    """Measured: bytes/s of a 1 GiB copy (read + write), bf16 FLOP/s of an 8192^3 matmul."""
    x = jax.random.normal(jax.random.key(0), (n_copy,), jnp.float32)
    bw = 2 * x.nbytes / (common.median_ms(jax.jit(lambda x: x * 1.0001), x, reps=20,
                                          warmup=5) / 1e3)
    a = jax.random.normal(jax.random.key(1), (n_mm, n_mm), jnp.bfloat16)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(a.dtype))
    mm_ms = common.median_ms(mm, a, reps=20, warmup=5)
    return {"bytes_per_s": bw, "flop_per_s": 2 * n_mm**3 / (mm_ms / 1e3)}


def cost(B, T, H, K, V, C, gate):
    """Fewest bytes (inputs read once, outputs written once) and FLOPs of the chunk algorithm."""
    tok = B * T * H
    g = {"scalar": 4 * tok, "vector": 4 * tok * K, "delta": 2 * tok, "gated_delta": 6 * tok,
         "vector_delta": 4 * tok * K + 2 * tok}[gate]
    fwd_bytes = 2 * tok * (2 * K + 2 * V) + g                        # q k v g (beta) in, o out
    bwd_bytes = 2 * tok * (2 * K + 2 * V) + g + 2 * tok * (2 * K + V) + g   # + do in, dq dk dv dg
    fwd_flops = 2 * tok * (C * K + C * V + 2 * K * V)
    bwd_flops = 2 * tok * (3 * C * K + 2 * C * V + 4 * K * V)
    if "delta" in gate:  # + K K^T, the UT transform (T W, T U) and u = U - W S, forward and back
        fwd_flops += 2 * tok * (C * K + C * K + C * V + K * V)
        bwd_flops += 2 * 2 * tok * (C * K + C * K + C * V + K * V)
    return dict(fwd_bytes=fwd_bytes, fwd_flops=fwd_flops, fwdbwd_bytes=bwd_bytes,
                fwdbwd_flops=fwd_flops + bwd_flops)


def inputs(B, T, H, D, gate, seed=0):
    """As the anchors drew them: gates log_sigmoid(N(0,1)) / 16; delta rule q, k l2-normalised,
    beta = sigmoid(N(0,1)) in bf16."""
    ks = jax.random.split(jax.random.key(seed), 6)
    n = lambda k, s: jax.random.normal(k, s, jnp.bfloat16)
    x = dict(q=n(ks[0], (B, T, H, D)), k=n(ks[1], (B, T, H, D)), v=n(ks[2], (B, T, H, D)))
    if gate != "delta":
        gshape = (B, T, H, D) if gate.startswith("vector") else (B, T, H)
        x["g"] = jax.nn.log_sigmoid(jax.random.normal(ks[4], gshape, jnp.float32)) / 16
    if "delta" in gate:
        l2 = lambda a: (a.astype(jnp.float32) / jnp.linalg.norm(a.astype(jnp.float32), axis=-1,
                                                               keepdims=True)).astype(a.dtype)
        x["q"], x["k"] = l2(x["q"]), l2(x["k"])
        x["beta"] = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H), jnp.float32)).astype(
            jnp.bfloat16)
    return x, n(ks[3], (B, T, H, D))


def bench(call, impl, config, x, do, reps, prof=False):
    fwd = jax.jit(lambda x: call(x, impl, config))
    loss = lambda x: jnp.sum(call(x, impl, config).astype(jnp.float32) * do.astype(jnp.float32))
    fb = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    cf = fwd.lower(x).compile()
    cb = fb.lower(x).compile()
    comp = time.perf_counter() - t0
    mem = lambda c: (lambda m: None if m is None else int(m.argument_size_in_bytes
                     + m.output_size_in_bytes + m.temp_size_in_bytes))(c.memory_analysis())
    # queued back to back (device time, as do_bench timed fla) and each call waited for (as jla)
    med = lambda c, inner: common.median_ms(c, x, reps=reps, warmup=5, inner=inner)
    r = dict(compile_s=comp, fwd_ms=med(cf, 10), fwdbwd_ms=med(cb, 10), fwd_sync_ms=med(cf, 1),
             fwdbwd_sync_ms=med(cb, 1), fwd_mem_bytes=mem(cf), fwdbwd_mem_bytes=mem(cb))
    if prof:
        r["fwd_kernels_us"] = profile.kernel_times(cf, x)
        r["fwdbwd_kernels_us"] = profile.kernel_times(cb, x)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--sweep", nargs="*", default=None, metavar="NAME",
                   help=f"also time these kernel tilings (all if none named): {', '.join(SWEEP)}")
    p.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=list(OPS))
    p.add_argument("--profile", action="store_true",
                   help="per-kernel device times of the Pallas impl (from a profiler trace)")
    p.add_argument("--impls", nargs="+", default=["chunk", "pallas"],
                   help="impls as the ops take them, e.g. chunk pallas pallas:triton")
    p.add_argument("--tag", default="", help="suffix of the JSON file name (keeps runs apart)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs")
    a = p.parse_args(argv)
    if a.quick:
        a.T, a.tokens, a.reps = [128], 256, 2
    H, D, C = 16, 128, 64
    base = TritonChunkConfig.default(jax.devices()[0])
    anchor_path, anchors = anchor_files.anchors_for(jax.devices()[0].device_kind)
    print("anchors:", anchor_path, flush=True)
    ceil = ceilings(1 << 20, 512) if a.quick else ceilings()
    print(f"ceilings: {ceil['bytes_per_s'] / 1e12:.2f} TB/s, "
          f"{ceil['flop_per_s'] / 1e12:.0f} TFLOP/s",
          flush=True)
    rows = []
    dev = jax.devices()[0].device_kind.replace(" ", "_")
    tag = f"_{a.tag}" if a.tag else ""
    save = lambda: common.write_json(
        f"ops_gpu_{dev}{tag}.json", rows, ceilings=ceil, tokens=a.tokens,
        anchors=os.path.basename(anchor_path),
        note="ratio x lib = anchor ms / our ms (> 1: we are faster)")
    for T in a.T:
        B = max(1, a.tokens // T)
        for op in a.ops:
            call, gate, names = OPS[op]
            x, do = inputs(B, T, H, D, gate)
            c = cost(B, T, H, D, D, C, gate)
            # (row name, impl, config fields over the default): the tilings are the Triton
            # kernel's, so they name it; a tuple config leaves any other kernel its defaults
            variants = [(i, i, {}) for i in a.impls]
            if a.sweep is not None:
                variants += [(f"pallas[{k}]", "pallas:triton", v) for k, v in SWEEP.items()
                             if (not a.sweep or k in a.sweep)
                             and (op == "gla" or not set(v) & set(GLA_ONLY))]
            for name, impl, over in variants:
                r, err = common.run_variant(base, over, lambda cfg: bench(
                    call, impl, (cfg,), x, do, a.reps,
                    a.profile and impl.startswith("pallas")))
                if err is not None:
                    print(f"{op} {name} T={T}: {type(err).__name__}: {str(err)[:400]}", flush=True)
                    rows.append(dict(op=op, impl=name, T=T, B=B, error=str(err)[:600]))
                    continue
                row = dict(op=op, impl=name, B=B, T=T, H=H, K=D, V=D, chunk=C, dtype="bfloat16",
                           **r, **c)
                for ph in ("fwd", "fwdbwd"):
                    s = row[f"{ph}_ms"] / 1e3
                    row[f"{ph}_floor_ms"] = 1e3 * max(c[f"{ph}_bytes"] / ceil["bytes_per_s"],
                                                      c[f"{ph}_flops"] / ceil["flop_per_s"])
                    row[f"{ph}_TBps"] = c[f"{ph}_bytes"] / s / 1e12
                    row[f"{ph}_TFLOPs"] = c[f"{ph}_flops"] / s / 1e12
                    for lib, key, ours in (("fla", f"fla.{names[0]}.{ph}_ms", f"{ph}_ms"),
                                           ("jla", f"jla.{names[1]}.{ph}_ms", f"{ph}_sync_ms")):
                        ref = anchors.get(T, {}).get(key)
                        row[f"{ph}_{lib}_ms"] = ref
                        row[f"{ph}_vs_{lib}"] = None if ref is None else ref / row[ours]
                rows.append(row)
                save()
                f = lambda v: "  -  " if v is None else f"{v:5.2f}"
                print(f"{op:<11}{name:<19}T={T:<6}compile {r['compile_s']:5.1f}s  "
                      f"fwd {row['fwd_ms']:7.3f} ms (floor {row['fwd_floor_ms']:.3f}, "
                      f"x fla {f(row['fwd_vs_fla'])}, x jla {f(row['fwd_vs_jla'])})  "
                      f"fwdbwd {row['fwdbwd_ms']:7.3f} ms (floor {row['fwdbwd_floor_ms']:.3f}, "
                      f"x fla {f(row['fwdbwd_vs_fla'])}, x jla {f(row['fwdbwd_vs_jla'])})  "
                      f"mem {(row['fwdbwd_mem_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
                for ph in ("fwd", "fwdbwd"):
                    if f"{ph}_kernels_us" in row:
                        print(f"  {ph} kernels:\n" + profile.format_times(row[f"{ph}_kernels_us"]),
                              flush=True)
    print("wrote", save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
