"""Correctness of every op with a GPU kernel (impl="pallas") on the device, forward and backward.

    python -m experiments.benchmarks.check_gpu [--quick]

Ops: linear_attention, simple_gla, gla, delta_rule, gated_delta_rule, kda.
Against the float32 XLA chunk form (HIGHEST-precision dots) and, where T is short, the lax.scan
reference: outputs, final states (under differentiation, from the forward alone, and from the
forward forced into the one-pass form) and the gradients of q, k, v, g and the initial state, with
packed documents and an initial state, at T in {100, 2048, 8192} and K = V in {64, 128}
(`--widths`) with float32 inputs, and bf16 inputs at T = 2048 (compared with the reference run on
the same bf16 values). Fresh random inputs per case. `--f32-dots tf32x3` runs the Triton kernels
with their float32 products as 3xTF32 (`TritonChunkConfig.f32_dots`; its JSON is tagged _tf32x3).
Writes benchmarks/results/check_gpu_<device>.json; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from linear_jax import ops
from linear_jax.kernels.configs import TritonChunkConfig

TOL = {"float32": 1e-3, "bfloat16": 2.5e-2}
OPS = {
    "linear_attention": lambda q, k, v, g, **kw: ops.linear_attention(q, k, v, **kw),
    "simple_gla": ops.simple_gla,
    "gla": ops.gla,
    "delta_rule": lambda q, k, v, g, beta, **kw: ops.delta_rule(q, k, v, beta, **kw),
    "gated_delta_rule": ops.gated_delta_rule,
    "kda": ops.kda,
}
DELTA = ("delta_rule", "gated_delta_rule", "kda")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def case(op, B, T, H, D, dtype, seed, ref_impl, V=None, kernel=None):
    """Relative errors of the kernels against `ref_impl`; kernel: the Triton config the kernels
    run with (None: the default)."""
    V = V or D
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    unit = lambda x: (x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)).astype(
        x.dtype)
    logsig = lambda s: jnp.asarray(-np.logaddexp(0.0, -rng.standard_normal(s) - 2.0), jnp.float32)
    x = dict(q=f(B, T, H, D), k=unit(f(B, T, H, D)), v=f(B, T, H, V),
             S0=jnp.asarray(rng.standard_normal((B, H, D, V)), jnp.float32))
    x["g"] = {"simple_gla": logsig((B, T, H)), "gla": logsig((B, T, H, D)) / 4,
              "gated_delta_rule": logsig((B, T, H)), "kda": logsig((B, T, H, D)) / 4}.get(op)
    if op in DELTA:
        x["beta"] = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32))
    seg = jnp.asarray(np.cumsum(rng.uniform(size=(B, T)) < 1 / 300, axis=1) % 3, jnp.int32)
    do = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal((B, H, D, V)), jnp.float32)
    names = [n for n in ("q", "k", "v", "g", "beta", "S0") if x.get(n) is not None]

    def run(impl, d, config=None):
        a = dict(x, **d)
        extra = (a["beta"],) if "beta" in a else ()
        o, S = OPS[op](a["q"], a["k"], a["v"], a["g"], *extra, initial_state=a["S0"],
                       segment_ids=seg, impl=impl, config=config)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)

    # the kernel config in a tuple, so that another backend's kernel keeps its defaults
    configs = kernel and (kernel,)
    vg = lambda impl, config=None: jax.jit(jax.value_and_grad(lambda d: run(impl, d, config),
                                                              has_aux=True))
    d = {n: x[n] for n in names}
    (_, (o, S)), g = vg("pallas", configs)(d)
    (_, (ro, rS)), rg = vg(ref_impl)({n: v.astype(jnp.float32) for n, v in d.items()})
    errs = {"o": rel(o, ro), "S": rel(S, rS), **{f"d{n}": rel(g[n], rg[n]) for n in names}}
    # the forward alone keeps no residuals and may take the one-pass form: check it as chosen and
    # forced (at these sizes the choice is the two-pass form except at T = 100); the forced
    # config is the Triton kernel's, in a tuple so that another kernel keeps its defaults
    base = kernel or TritonChunkConfig.default(jax.devices()[0])
    fused = dataclasses.replace(base, fused_fwd=True)
    for tag, config in (("primal", configs), ("fused", (fused,))):
        po, pS = jax.jit(lambda d: run("pallas", d, config)[1])(d)
        errs[f"o_{tag}"], errs[f"S_{tag}"] = rel(po, ro), rel(pS, rS)
    return errs


def cases(widths, dtypes, lengths, quick=False) -> list[tuple[int, int, str]]:
    """The grid's (T, K, dtype) cases: float32 at every T, bf16 at T = 2048, each width;
    --quick two of them; only the dtypes and lengths asked for."""
    grid = [(T, D, "float32") for T in (100, 2048, 8192) for D in widths]
    grid += [(2048, D, "bfloat16") for D in widths]
    if quick:
        grid = [(100, 64, "float32"), (2048, 128, "bfloat16")]
    return [c for c in grid if c[2] in dtypes and c[0] in lengths]


def op_cases(op: str, grid: list) -> list:
    """The cases of `grid` op runs: all, but linear attention (no gate) its first and last,
    once each where they are one case (a process of `run_device.sh checksplit`)."""
    return grid if op != "linear_attention" else list(dict.fromkeys(grid[:1] + grid[-1:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ops", nargs="+", default=list(OPS))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="K = V of the grid")
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 2048, 8192],
                   help="the grid's T values kept (bf16 runs at 2048 only): one process per "
                        "case splits a slow grid across the host's cores")
    p.add_argument("--expand-v", type=float, default=1.0,
                   help="V = expand_v K (Gated DeltaNet's layer: 2)")
    p.add_argument("--f32-dots", choices=["ieee", "tf32x3"], default=None,
                   help="the Triton kernels' float32 products (TritonChunkConfig.f32_dots; "
                        "default: the config's)")
    a = p.parse_args(argv)
    grid = cases(a.widths, a.dtypes, a.lengths, a.quick)
    kernel = None if a.f32_dots is None else TritonChunkConfig(f32_dots=a.f32_dots)
    rows, bad, seed = [], 0, 0
    dev = jax.devices()[0].device_kind.replace(" ", "_")
    tag = f"_{a.f32_dots}" if a.f32_dots else ""
    save = lambda: common.write_json(f"check_gpu_{dev}{tag}.json", rows, failures=bad,
                                     tolerances=TOL, f32_dots=a.f32_dots)
    for op in a.ops:
        for T, D, dt in op_cases(op, grid):
            seed += 1
            B, H = (2, 4) if T <= 2048 else (1, 4)
            V = int(D * a.expand_v)
            ref = "recurrent" if T <= 2048 else "chunk"
            t0 = time.perf_counter()
            try:
                errs = case(op, B, T, H, D, getattr(jnp, dt), seed, ref, V, kernel)
                worst = max(errs.values())
                ok = worst <= TOL[dt]
                err = None
            except Exception as e:  # a kernel that fails to compile is a failure, reported
                errs, worst, ok, err = {}, float("inf"), False, f"{type(e).__name__}: {e}"[:600]
            bad += not ok
            rows.append(dict(op=op, B=B, T=T, H=H, K=D, V=V, dtype=dt, reference=ref, errors=errs,
                             worst=worst, tol=TOL[dt], ok=ok, error=err,
                             seconds=time.perf_counter() - t0))
            print(f"{'ok  ' if ok else 'FAIL'} {op:<17} T={T:<5} K={D:<4} V={V:<4} {dt:<9} "
                  f"vs {ref:<9} "
                  f"worst {worst:.2e} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + (f"  {err}" if err else ""), flush=True)
            save()  # after every case: a run cut off at its time limit still leaves its rows
    path = save()
    print(f"{'FAILED: ' + str(bad) + ' case(s)' if bad else 'all passed'}; wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
