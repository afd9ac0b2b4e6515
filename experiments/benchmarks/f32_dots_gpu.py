"""The Triton kernels' float32 products on the device: IEEE float32 on the CUDA cores (the
default) against 3xTF32 on the tensor cores (`TritonChunkConfig.f32_dots`), beside the chunk form
that "auto" would otherwise leave them to.

    python -m experiments.benchmarks.f32_dots_gpu                 # the device
    python -m experiments.benchmarks.f32_dots_gpu --quick         # CPU, seconds: the script runs

Forms, each jitted with every input an argument, float32 inputs:
  chunk   impl="chunk" (XLA; its dots at the process's matmul precision);
  ieee    impl="pallas:triton", f32_dots="ieee";
  tf32x3  impl="pallas:triton", f32_dots="tf32x3".
Shapes: `parity`, the state-tracking protocol's DeltaNet (3 seeds x 256 rows, T = 40, 4 heads of
K = V = 32: on an H100 its train step took 86 ms through the IEEE kernels and 15 ms through the
chunk form, session 34, not under the same sharing of the GPU), and `lm`, the language-model
shape (B = 8, T = 2048, 16 heads of 128).

Each form is first compared with the chunk form under HIGHEST precision on the same values
(output, final state and the gradients of every input of sum(o * do) + sum(S * dS)); tf32x3 is
`ok` when its worst relative error is within --tol (default 1e-5, the float32 contract's) or
within 4x the ieee form's. Then the median ms of the forward + backward, the forms interleaved
(`common.sync_ms`), beside the shape's floor (`common.decay_family_cost`). Writes
benchmarks/results/f32_dots_<device>.json after every row; exits 1 on a failed check.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common, vmap_gpu
from experiments.benchmarks import kernel_checks as kc
from linear_jax.kernels.configs import TritonChunkConfig

f32 = jnp.float32
SHAPES = {"parity": (768, 40, 4, 32, 32), "lm": (8, 2048, 16, 128, 128)}
QUICK = {"tiny": (2, 40, 2, 16, 16)}
OPS = ("delta_rule", "gated_delta_rule", "simple_gla", "gla", "linear_attention")
GATE = {"delta_rule": "none", "gated_delta_rule": "scalar", "simple_gla": "scalar",
        "gla": "vector", "linear_attention": "none"}
FORMS = ("chunk", "ieee", "tf32x3")


def inputs(op, B, T, H, K, V, seed=0) -> tuple[dict, tuple]:
    """(arrays, the names differentiated): unit-norm keys for the delta rule, gates mild enough
    that the state carries across the sequence."""
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), f32)   # noqa: E731
    k = r(B, T, H, K)
    x = {"q": r(B, T, H, K), "k": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
         "v": r(B, T, H, V), "do": r(B, T, H, V), "dS": r(B, H, K, V)}
    if op in ("delta_rule", "gated_delta_rule"):
        x["beta"] = jax.nn.sigmoid(r(B, T, H))
    if GATE[op] == "scalar":
        x["g"] = jax.nn.log_sigmoid(r(B, T, H) + 4.0)
    if GATE[op] == "vector":
        x["g"] = jax.nn.log_sigmoid(r(B, T, H, K) + 4.0) / 16.0
    return x, tuple(n for n in ("q", "k", "v", "g", "beta") if n in x)


def call(op, form, quick=False):
    """f(x) -> (o, S) of `op` through `form` (`vmap_gpu.call`, whose input names these share)."""
    if form == "chunk":
        return vmap_gpu.call(op, "chunk")
    return vmap_gpu.call(op, "pallas:triton", TritonChunkConfig(
        f32_dots=form, interpret=True if quick else None))


def row(op, name, shape, args) -> dict:
    B, T, H, K, V = shape
    x, names = inputs(op, B, T, H, K, V)
    a = [x[n] for n in names]
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(kc.loss_and_grads(call(op, "chunk"), names))
        g_r, (o_r, S_r) = ref(x, *a)
    grads = {f: jax.jit(kc.loss_and_grads(call(op, f, args.quick), names)) for f in args.forms}
    out = {"op": op, "shape": name, "B": B, "T": T, "H": H, "K": K, "V": V, "dtype": "float32",
           "errors": {}}
    for form, grad in grads.items():
        g, (o, S) = grad(x, *a)
        e = {"o": kc.rel(o, o_r), "S": kc.rel(S, S_r),
             **{"d" + n: kc.rel(u, w) for n, u, w in zip(names, g, g_r, strict=True)}}
        out["errors"][form] = {k: float(f"{v:.3g}") for k, v in e.items()}
    worst = {f: max(e.values()) for f, e in out["errors"].items()}
    out["worst"] = worst
    if "tf32x3" in worst:
        out["ok"] = bool(worst["tf32x3"] <= max(args.tol, 4 * worst.get("ieee", 0.0)))
    ms = common.sync_ms([lambda x, gr=gr: gr(x, *[x[n] for n in names]) for gr in grads.values()],
                        x, reps=args.reps)
    out.update({f"{f}_fwdbwd_ms": m for f, m in zip(grads, ms, strict=True)})
    cost = common.decay_family_cost(B, T, H, K, V, 64, GATE[op])
    out["floor_fwd_ms"] = common.floor_ms(cost, args.ceilings)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--ops", nargs="*", choices=OPS, default=list(OPS))
    p.add_argument("--shapes", nargs="*", help=f"names among {sorted(SHAPES)} (default: all)")
    p.add_argument("--forms", nargs="*", choices=FORMS, default=list(FORMS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    shapes = QUICK if args.quick else {n: SHAPES[n] for n in (args.shapes or SHAPES)}
    if args.quick:
        args.reps = 2
    args.ceilings = common.measure_ceilings(1 << 20, 256) if args.quick else \
        common.measure_ceilings()
    rows, bad = [], 0
    save = lambda: common.write_json(common.device_file("f32_dots"), rows, reps=args.reps,  # noqa: E731
                                     ceilings=args.ceilings, tol=args.tol)
    print("| op | shape | " + " | ".join(f"{f} ms" for f in args.forms)
          + " | fwd floor ms | " + " | ".join(f"{f} err" for f in args.forms) + " | ok |")
    print("|---" * (3 + 2 * len(args.forms)) + "|---|")
    for name, shape in shapes.items():
        for op in args.ops:
            try:
                r = row(op, name, shape, args)
            except Exception as e:  # noqa: BLE001 - a failed case is a row, the rest go on
                r = {"op": op, "shape": name, "ok": False, "error": kc.tail(e, 12)}
                print(f"{op} {name} FAILED:\n{kc.tail(e)}", flush=True)
            rows.append(r)
            save()
            bad += not r.get("ok", True)
            if "error" in r:
                continue
            print(f"| {op} | {name} | "
                  + " | ".join(f"{r[f + '_fwdbwd_ms']:.3f}" for f in args.forms)
                  + f" | {r['floor_fwd_ms']:.3f} | "
                  + " | ".join(f"{r['worst'][f]:.2e}" for f in args.forms)
                  + f" | {r.get('ok', '')} |", flush=True)
    print("wrote", save())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
