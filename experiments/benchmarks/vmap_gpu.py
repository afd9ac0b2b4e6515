"""The ops' kernels under `jax.vmap`, as the multi-seed trainer runs them (`training.seeds`: the
train step vmapped over seeds and learning rates): each op's "auto" choice against its chunk form,
both vmapped over a leading members axis, at the paper-protocol shapes (MQAR at Zoology's setup:
3 members, 256 rows of 256 tokens, 2 heads of width d_model / 2, bfloat16 as the models compute;
`ssd`: Mamba-2 itself, 2 heads of P = d_model values and d_state 16, as the MQAR cells run it).

    python -m experiments.benchmarks.vmap_gpu [--widths 64 128 256 512] [--members 3] [--B 256]

Per op and width, a row: the implementation "auto" resolves to (a kernel, or the chunk form when
the kernels decline the shape); the relative norm error of the output, final state and the
gradient of every input of `sum(o * do) + sum(S * dS)`, for "auto" and for the bfloat16 chunk form,
each against the chunk form in float32 on the same values (the second is the bfloat16 noise floor
the first is judged by: `ok` when auto's worst error is within 2x the chunk form's, or 2e-2);
and the median ms of the vmapped forward + backward of each. A kernel without a batching rule, or
one that mishandles the added axis, fails here before a week of training rests on it. Writes
benchmarks/results/vmap_<device>.json after every row.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks import kernel_checks as kc
from linear_jax import ops
from linear_jax.ops import registry

f32 = jnp.float32


def inputs(op: str, M, B, T, H, K, dtype, key) -> tuple[dict, tuple]:
    """(arrays with a leading members axis, the names differentiated)."""
    ks = iter(jax.random.split(key, 8))
    r = lambda *s: jax.random.normal(next(ks), (M, B, T, H) + s, f32)   # noqa: E731
    if op == "ssd":
        return ssd_inputs(M, B, T, H, 2 * K, dtype, ks)
    q, k, v = r(K), r(K), r(K)
    x = {"q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype)}
    if op in ("delta_rule", "gated_delta_rule"):
        x["k"] = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
        x["beta"] = jax.nn.sigmoid(r())
    if op == "gla":
        x["g"] = jax.nn.log_sigmoid(r(K) + 4.0) / 16.0
    if op in ("simple_gla", "gated_delta_rule"):
        x["g"] = jax.nn.log_sigmoid(r() + 4.0)
    x["do"] = r(K).astype(dtype)
    x["dS"] = jax.random.normal(next(ks), (M, B, H, K, K), f32)
    names = tuple(n for n in ("q", "k", "v", "g", "beta") if n in x)
    return x, names


def ssd_inputs(M, B, T, H, P, dtype, ks, N=16):
    """Mamba-2 at MQAR's setup (expand 2, H heads of P = 2 d_model / H, d_state N = 16, one group
    of B and C) under the names the rows use: q = C, k = B, v = x, g = dt before its softplus."""
    r = lambda *s: jax.random.normal(next(ks), (M, B, T) + s, f32)      # noqa: E731
    x = {"q": r(1, N).astype(dtype), "k": r(1, N).astype(dtype), "v": r(H, P).astype(dtype),
         "g": r(H) - 2.0, "A": -jnp.exp(jax.random.normal(next(ks), (M, H), f32))}
    x["do"] = r(H, P).astype(dtype)
    x["dS"] = jax.random.normal(next(ks), (M, B, H, N, P), f32)
    return x, ("q", "k", "v", "g")


def call(op: str, impl: str, config=None):
    """f(x) -> (o, S) of `op` on the arrays of x (named as `inputs` names them)."""
    def f(x):
        a = {n: x[n] for n in ("q", "k", "v")}
        kw = dict(impl=impl, config=config)
        if op == "linear_attention":
            return ops.linear_attention(**a, **kw)
        if op == "gla":
            return ops.gla(**a, g=x["g"], **kw)
        if op == "ssd":                             # x, dt, A, B, C (inputs' names above)
            return ops.ssd(x["v"], x["g"], x["A"], x["k"], x["q"], **kw)
        if op == "simple_gla":                      # Mamba-2's SSD runs on it
            return ops.simple_gla(**a, g=x["g"], **kw)
        if op == "delta_rule":
            return ops.delta_rule(**a, beta=x["beta"], **kw)
        return ops.gated_delta_rule(**a, g=x["g"], beta=x["beta"], **kw)
    return f


def vmapped(op: str, impl: str, names):
    """grad(x, *inputs) -> (their gradients, (o, S)), vmapped over the members and jitted."""
    return jax.jit(jax.vmap(kc.loss_and_grads(call(op, impl), names)))


def row(op, d, args) -> dict:
    M, B, T, H = args.members, args.B, args.T, 2
    K = d // H
    x, names = inputs(op, M, B, T, H, K, jnp.bfloat16, jax.random.key(d))
    one = {n: v[0] for n, v in x.items()}
    choice = registry.resolve(op, "auto", T, None, args=(one["q"], one["k"], one["v"]))
    out = {"op": op, "d_model": d, "members": M, "B": B, "T": T, "H": H,
           "K": one["q"].shape[-1], "V": one["v"].shape[-1], "auto": choice.impl}
    xf = kc.as_float32(x)
    g_r, (o_r, S_r) = vmapped(op, "chunk", names)(xf, *[xf[n] for n in names])
    errors = {}
    for impl in ("auto", "chunk"):
        grad = vmapped(op, impl, names)
        t0 = time.perf_counter()
        g, (o, S) = grad(x, *[x[n] for n in names])
        jax.block_until_ready(g)
        out[f"{impl}_compile_run_s"] = round(time.perf_counter() - t0, 1)
        e = {"o": kc.rel(o.astype(f32), o_r), "S": kc.rel(S, S_r)}
        for n, a, b in zip(names, g, g_r, strict=True):
            e["d" + n] = kc.rel(jnp.asarray(a, f32), b)
        errors[impl] = {k: float(f"{v:.3g}") for k, v in e.items()}
        out[f"{impl}_fwdbwd_ms"] = common.median_ms(
            lambda x: grad(x, *[x[n] for n in names]), x, reps=args.reps)
    out["errors"] = errors
    worst = {i: max(e.values()) for i, e in errors.items()}
    out["ok"] = bool(np.isfinite(worst["auto"]) and
                     worst["auto"] <= max(2 * worst["chunk"], 2e-2))
    out["speedup"] = round(out["chunk_fwdbwd_ms"] / out["auto_fwdbwd_ms"], 2)
    return out


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = ["linear_attention", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "ssd"]
    p.add_argument("--ops", nargs="*", choices=names, default=names)
    p.add_argument("--widths", type=int, nargs="*", default=[64, 128, 256, 512])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    rows = []

    def save() -> str:                 # after every row: a run cut at its time limit keeps them
        return common.write_json(common.device_file("vmap"), rows, members=args.members, B=args.B,
                                 T=args.T)

    print("| op | d_model | K | auto | auto ms | chunk ms | speedup | auto worst err | chunk "
          "bf16 worst err | ok |\n|---|---|---|---|---|---|---|---|---|---|")
    for op in args.ops:
        for d in args.widths:
            try:
                r = row(op, d, args)
            except Exception as e:  # noqa: BLE001 - a failed case is a row, the rest go on
                r = {"op": op, "d_model": d, "ok": False, "error": kc.tail(e, 12)}
                print(f"{op} d={d} FAILED:\n{kc.tail(e)}", flush=True)
                rows.append(r)
                save()
                continue
            rows.append(r)
            save()
            w = {i: max(e.values()) for i, e in r["errors"].items()}
            print(f"| {op} | {d} | {r['K']} | {r['auto']} | {r['auto_fwdbwd_ms']:.2f} | "
                  f"{r['chunk_fwdbwd_ms']:.2f} | {r['speedup']} | {w['auto']:.3g} | "
                  f"{w['chunk']:.3g} | {r['ok']} |", flush=True)
    print("wrote", save())
    return rows


if __name__ == "__main__":
    main()
