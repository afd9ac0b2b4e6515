"""GPU check and timings of the element-wise scan kernel (`hgrn`, `diagonal_scan`, impl="pallas")
against the chunked associative scan (impl="chunk").

    python -m experiments.benchmarks.elementwise_gpu [--T 2048 8192] [--D 2048 4096] [--sweep]
    python -m experiments.benchmarks.elementwise_gpu --quick        # CPU, seconds: the script runs

First a float32 check, pallas against chunk, at a shape that exercises everything (T not a multiple
of the chunk, D not a multiple of the channel block, packed documents, an initial state): outputs,
final states and the gradients of every float input through both. Any relative error above 1e-4
prints the failures and exits with status 1 before timing anything.

Then, for B*T = --tokens (16384) tokens, each T and D, bf16 inputs (complex64 for the complex
diagonal scan): median ms of the forward and of forward+backward (grad of sum(h * dy) + sum(hT)
w.r.t. every float input), calls queued back to back (device time), the compile seconds, and the
HBM floor of the shape: forward reads a, x and writes h; the backward reads a, h, dy and writes
da, dx; floor = bytes / measured copy bandwidth. --sweep also times kernel configs
(`TritonScanConfig` fields over its device default, passed to the op as `config=`; impl
"pallas:triton", recorded as impl "pallas[name]").
Writes benchmarks/results/elementwise_gpu_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from linear_jax.kernels.configs import TritonScanConfig
from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.hgrn import hgrn

SWEEP = {"bd32": dict(block_d=32, min_block_d=32), "bd64": dict(block_d=64, min_block_d=64),
         "bd128": dict(block_d=128, min_block_d=128), "bd256": dict(block_d=256, min_block_d=256),
         "c16": dict(chunk=16, chunk_bwd=16), "c32": dict(chunk=32), "c128": dict(chunk=128,
                                                                               chunk_bwd=64),
         "w1": dict(warps=1), "w2": dict(warps=2), "w4": dict(warps=4)}
CHECK_TOL = 1e-4


def _case(op, B, T, D, dtype, seed=0, segments=True):
    """(call(d, impl, config=None) -> (h, hT), inputs d: the differentiated arrays) of one op at
    one shape."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    seg = (np.cumsum(rng.uniform(size=(B, T)) < 1 / 300, axis=1).astype(np.int32) if segments
           else None)
    seg = None if seg is None else jnp.asarray(seg)
    if op == "hgrn":
        g = -np.logaddexp(0.0, -(f(B, T, D) + 3.0))                      # log_sigmoid, mostly > -1
        d = dict(x=jnp.asarray(f(B, T, D), dtype), g=jnp.asarray(g, dtype),
                 h0=jnp.asarray(f(B, D)))
        return (lambda d, impl, config=None: hgrn(d["x"], d["g"], initial_state=d["h0"],
                                                  segment_ids=seg, impl=impl, config=config)), d
    if op == "diagonal_scan":
        d = dict(a=jnp.asarray(np.tanh(2 * f(B, T, D)), dtype), x=jnp.asarray(f(B, T, D), dtype),
                 h0=jnp.asarray(f(B, D)))
    else:  # diagonal_scan_complex: the LRU's rotation, |a| close to 1
        a = np.exp(-np.exp(f(B, T, D) - 4) + 1j * f(B, T, D))
        c = lambda *s: f(*s) + 1j * f(*s)
        d = dict(a=jnp.asarray(a, jnp.complex64), x=jnp.asarray(c(B, T, D), jnp.complex64),
                 h0=jnp.asarray(c(B, D), jnp.complex64))
    return (lambda d, impl, config=None: diagonal_scan(d["a"], d["x"], initial_state=d["h0"],
                                                       segment_ids=seg, impl=impl,
                                                       config=config)), d


def _loss(call, impl, dy, config=None):
    def loss(d):
        h, hT = call(d, impl, config)
        re = lambda z, w: jnp.sum(jnp.real(z * jnp.conj(w)).astype(jnp.float32))
        return re(h, dy) + jnp.sum(jnp.real(hT)) + jnp.sum(jnp.imag(hT))
    return loss


def _ri(z):
    z = np.asarray(z)
    return np.stack([z.real, z.imag]).astype(np.float64)


def _rel(a, b):
    a, b = _ri(a), _ri(b)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(ops, B, T, D):
    """float32 pallas vs chunk; returns rows of (op, what, relative error)."""
    rows = []
    for op in ops:
        call, d = _case(op, B, T, D, jnp.float32, seed=1)
        dy = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, D)),
                         jnp.complex64 if op.endswith("complex") else jnp.float32)
        out = {}
        for impl in ("pallas", "chunk"):
            vg = jax.jit(jax.value_and_grad(lambda d: (_loss(call, impl, dy)(d), call(d, impl)),
                                            has_aux=True))
            (_, (h, hT)), grads = vg(d)
            out[impl] = dict(h=h, hT=hT, **{f"d{k}": v for k, v in grads.items()})
        for what in out["chunk"]:
            err = _rel(out["pallas"][what], out["chunk"][what])
            rows.append(dict(op=op, what=what, rel_err=err, ok=err <= CHECK_TOL))
            verdict = "ok" if err <= CHECK_TOL else "FAIL"
            print(f"check {op:<22}{what:<4} rel err {err:.2e}  {verdict}", flush=True)
    return rows


def bench(call, impl, config, d, dy, reps):
    fwd = jax.jit(lambda d: call(d, impl, config))
    fb = jax.jit(jax.grad(_loss(call, impl, dy, config)))
    t0 = time.perf_counter()
    cf = fwd.lower(d).compile()
    cb = fb.lower(d).compile()
    comp = time.perf_counter() - t0
    inner = 1 if jax.default_backend() == "cpu" else 10
    med = lambda c: common.median_ms(c, d, reps=reps, warmup=3, inner=inner)
    return dict(compile_s=comp, fwd_ms=med(cf), fwdbwd_ms=med(cb))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--D", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="B * T")
    p.add_argument("--ops", nargs="+", default=["hgrn", "diagonal_scan", "diagonal_scan_complex"])
    p.add_argument("--impls", nargs="+", default=["chunk", "pallas"])
    p.add_argument("--sweep", nargs="*", default=None, metavar="NAME",
                   help=f"also time these kernel configs (all if none named): {', '.join(SWEEP)}")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--tag", default="", help="suffix of the JSON file name (keeps runs apart)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on any backend (CPU: seconds)")
    a = p.parse_args(argv)
    check_shape = (2, 1000, 300)
    if a.quick:
        a.T, a.D, a.tokens, a.reps, check_shape = [12], [32], 24, 2, (2, 21, 40)
    dev = jax.devices()[0].device_kind.replace(" ", "_")
    base = TritonScanConfig.default(jax.devices()[0])
    tag = f"_{a.tag}" if a.tag else ""
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)

    checks = check(a.ops, *check_shape)
    ceil = common.measure_ceilings(1 << 20, 256) if a.quick else common.measure_ceilings(1 << 30)
    print(f"copy bandwidth {ceil['bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    rows = []
    save = lambda: common.write_json(
        f"elementwise_gpu_{dev}{tag}.json", rows, ceilings=ceil, tokens=a.tokens, check=checks,
        check_tol=CHECK_TOL, note="floor = HBM bytes (fwd: a, x in, h out; bwd: a, h, dy in, "
        "da, dx out) / measured copy bandwidth; bf16 inputs (complex64 for the complex scan)")
    bad = [r for r in checks if not r["ok"]]
    if bad:
        save()
        print("CHECK FAILED (pallas vs chunk, float32):", file=sys.stderr)
        for r in bad:
            print(f"  {r['op']} {r['what']}: rel err {r['rel_err']:.3e} > {CHECK_TOL}",
                  file=sys.stderr)
        return 1

    for T in a.T:
        B = max(1, a.tokens // T)
        for D in a.D:
            for op in a.ops:
                cplx = op.endswith("complex")
                call, d = _case(op, B, T, D, jnp.bfloat16)
                dy = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, D)),
                                 jnp.complex64 if cplx else jnp.bfloat16)
                item = 8 if cplx else 2
                cost = dict(fwd_bytes=3 * B * T * D * item, fwdbwd_bytes=8 * B * T * D * item)
                # (row name, impl, config fields over the default): the sweep is the Triton
                # kernel's; a tuple config leaves any other kernel its defaults
                variants = [(i, i, {}) for i in a.impls]
                if a.sweep is not None:
                    variants += [(f"pallas[{k}]", "pallas:triton", v) for k, v in SWEEP.items()
                                 if not a.sweep or k in a.sweep]
                for name, impl, over in variants:
                    r, err = common.run_variant(base, over, lambda cfg: bench(
                        call, impl, (cfg,), d, dy, a.reps))
                    if err is not None:  # a config that fails to compile is recorded
                        print(f"{op} {name} T={T} D={D}: {type(err).__name__}: {str(err)[:400]}",
                              flush=True)
                        rows.append(dict(op=op, impl=name, B=B, T=T, D=D, error=str(err)[:600]))
                        continue
                    row = dict(op=op, impl=name, B=B, T=T, D=D,
                               dtype="complex64" if cplx else "bfloat16", **r, **cost)
                    for ph in ("fwd", "fwdbwd"):
                        row[f"{ph}_floor_ms"] = 1e3 * cost[f"{ph}_bytes"] / ceil["bytes_per_s"]
                        row[f"{ph}_TBps"] = cost[f"{ph}_bytes"] / (row[f"{ph}_ms"] / 1e3) / 1e12
                    rows.append(row)
                    save()
                    print(f"{op:<22}{name:<16}B={B:<3}T={T:<6}D={D:<5} compile "
                          f"{r['compile_s']:5.1f}s  fwd {row['fwd_ms']:7.3f} ms "
                          f"(floor {row['fwd_floor_ms']:.3f}, {row['fwd_TBps']:.2f} TB/s)  "
                          f"fwdbwd {row['fwdbwd_ms']:7.3f} ms (floor {row['fwdbwd_floor_ms']:.3f},"
                          f" {row['fwdbwd_TBps']:.2f} TB/s)", flush=True)
    print("wrote", save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
