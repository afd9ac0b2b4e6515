"""Recurrent vs chunk XLA forms of the chunk-family ops on the host's default device.

    python -m experiments.benchmarks.ops_xla [--T 256 1024 4096] [--quick]

Prints median ms of the forward and of forward+backward for each op, impl and T, with the floor
for the shape, and writes benchmarks/results/ops_xla_<platform>.json.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments import op_examples
from experiments.benchmarks import common

GATE = {"linear_attention": "none", "simple_gla": "scalar", "gla": "vector"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="T in {256, 1024}, 3 reps")
    a = p.parse_args(argv)
    if a.quick:
        a.T, a.reps = [256, 1024], 3

    ceilings = common.measure_ceilings()
    rows = []
    for T in a.T:
        for ex in op_examples.examples(a.batch, T, a.heads, a.dim):
            if ex.name not in GATE:
                continue
            cost = common.decay_family_cost(a.batch, T, a.heads, a.dim, a.dim, a.chunk,
                                            GATE[ex.name])
            for impl in ("recurrent", "chunk"):
                fwd = jax.jit(lambda kw, impl=impl, ex=ex: ex.fn(**kw, impl=impl,
                                                                 chunk_size=a.chunk)[0])
                diff = {n: x for n, x in ex.inputs.items() if n in ("q", "k", "v", "g")}
                rest = {n: x for n, x in ex.inputs.items() if n not in diff}
                loss = lambda d, impl=impl, ex=ex: jnp.sum(
                    ex.fn(**d, **rest, impl=impl, chunk_size=a.chunk)[0])
                bwd = jax.jit(jax.grad(loss))
                row = {
                    "op": ex.name, "impl": impl, "B": a.batch, "T": T, "H": a.heads,
                    "K": a.dim, "V": a.dim, "chunk_size": a.chunk, "dtype": "float32",
                    "compile_s": common.compile_seconds(fwd, ex.inputs),
                    "fwd_ms": common.median_ms(fwd, ex.inputs, reps=a.reps),
                    "fwdbwd_ms": common.median_ms(bwd, diff, reps=a.reps),
                    "floor_fwd_ms": common.floor_ms(cost, ceilings),
                    **cost,
                }
                rows.append(row)
                print(f"{ex.name:<18}{impl:<11}T={T:<6} fwd {row['fwd_ms']:9.2f} ms  "
                      f"fwd+bwd {row['fwdbwd_ms']:9.2f} ms  floor {row['floor_fwd_ms']:7.3f} ms")
    path = common.write_json(f"ops_xla_{jax.devices()[0].platform}.json", rows,
                             ceilings=ceilings)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
