"""Run every op with every implementation on random data and check it against the reference.

    python -m experiments.check_ops [--T 1024] [--batch 2] [--heads 4] [--dim 64] [--pallas]

Prints a table of ops x impls with the relative error to the `lax.scan` reference (outputs and
final state) and the median wall time of the jitted call. Pallas kernels run only with --pallas
(on a CPU they run in interpret mode, which is slow but checks the same kernels CI tests).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import op_examples
from experiments.benchmarks import common


def _rel(a, b) -> float:
    """Relative-norm error over every array of a result (states may be tuples, values complex)."""
    num = sum(float(np.linalg.norm(np.asarray(x) - np.asarray(y)) ** 2)
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    den = sum(float(np.linalg.norm(np.asarray(y)) ** 2) for y in jax.tree.leaves(b))
    return (num / max(den, 1e-60)) ** 0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=1000, help="sequence length (not a chunk multiple)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="head dim K = V")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--pallas", action="store_true", help="also run impl='pallas'")
    args = p.parse_args(argv)

    impls = ["recurrent", "chunk"] + (["pallas"] if args.pallas else [])
    examples = op_examples.examples(args.batch, args.T, args.heads, args.dim, seed=0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; B={args.batch} "
          f"T={args.T} H={args.heads} K=V={args.dim}, float32")
    rows, failures = [], 0
    for ex in tqdm(examples, desc="ops", unit="op"):
        ref = None
        for impl in impls:
            if impl not in ex.impls:
                continue
            f = jax.jit(lambda kw, impl=impl, ex=ex: ex.fn(**kw, **ex.static, impl=impl))
            t0 = time.perf_counter()
            out, state = jax.block_until_ready(f(ex.inputs))
            compile_s = time.perf_counter() - t0
            if ref is None:
                ref = (out, state)
            e_out, e_state = _rel(out, ref[0]), _rel(state, ref[1])
            ok = e_out < 2e-4 and e_state < 2e-4 and bool(jnp.isfinite(out).all())
            failures += not ok
            ms = common.median_ms(f, ex.inputs, reps=args.reps, warmup=0)
            rows.append((ex.name, impl, e_out, e_state, ms, compile_s, "ok" if ok else "FAIL"))

    header = f"{'op':<28}{'impl':<11}{'err(o)':>10}{'err(S)':>10}{'ms':>10}{'compile s':>11}  check"
    print("\n" + header + "\n" + "-" * len(header))
    for name, impl, eo, es, ms, cs, ok in rows:
        print(f"{name:<28}{impl:<11}{eo:>10.1e}{es:>10.1e}{ms:>10.2f}{cs:>11.2f}  {ok}")
    print(f"\n{len(rows) - failures}/{len(rows)} implementations agree with the reference "
          "(relative error < 2e-4)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
