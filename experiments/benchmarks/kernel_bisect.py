"""Which kernel of an op fails to compile: every Pallas call of the op's forward and of its
gradient, compiled alone.

    python -m experiments.benchmarks.kernel_bisect --op kda --dtype bfloat16 [--T 2048] [--D 64]

A program holding several Pallas kernels fails as a whole when one of them does not compile, and
XLA's message need not say which (the Triton compiler's "Context: []"). This script traces the
op's primal and the gradient of sum(o * do) + sum(S * dS) w.r.t. every float input (the check_gpu
case: documents, an initial state), collects every `pallas_call` in the traced programs (through
nested jits and custom VJPs), and compiles each one as a program of its own on zero inputs of its
shapes. It prints one line a kernel (its name, where it was written, ok or the error's last
lines) and writes benchmarks/results/kernel_bisect_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import check_gpu, common
from experiments.benchmarks.kernel_checks import tail
from linear_jax.ops import registry


def pallas_calls(jaxpr) -> list:
    """Every pallas_call equation of a (closed) jaxpr, its sub-jaxprs included, in trace order."""
    found = []

    def walk(j):
        j = getattr(j, "jaxpr", j)
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(eqn)
                continue
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                        walk(sub)
    walk(jaxpr)
    return found


def kernel_name(eqn) -> str:
    info = getattr(eqn.params["jaxpr"], "debug_info", None)
    src = getattr(info, "func_src_info", None)
    return src or str(eqn.params.get("name") or eqn.params.get("name_and_src_info") or "?")


def alone(eqn):
    """The one kernel `eqn` as its own jitted program, and its inputs' shapes."""
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    return jax.jit(lambda *a: eqn.primitive.bind(*a, **eqn.params)), args


def compile_alone(eqn) -> None:
    """Lower and compile the one kernel `eqn` as its own jitted program."""
    fn, args = alone(eqn)
    fn.lower(*args).compile()


def distinct_kernels(progs: dict):
    """(phase, eqn, name, input shapes) of every Pallas call of `programs`' jaxprs, each kernel
    at each set of input shapes once (the primal's kernels recur in the gradient)."""
    seen = set()
    for phase, jaxpr in progs.items():
        for eqn in pallas_calls(jaxpr):
            name = kernel_name(eqn)
            shapes = [f"{v.aval.dtype}{list(v.aval.shape)}" for v in eqn.invars]
            if (name, tuple(shapes)) not in seen:
                seen.add((name, tuple(shapes)))
                yield phase, eqn, name, shapes


def case_args(p, *, op, ops, dtype, D) -> None:
    """The flags of the traced case (op, dtype, T, D, B, H), with these defaults."""
    p.add_argument("--op", default=op, choices=sorted(ops))
    p.add_argument("--dtype", default=dtype)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--D", type=int, default=D, help="K (and V unless --V)")
    p.add_argument("--V", type=int, default=None, help="the value width, if not D")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)


def programs(op, B, T, H, D, dtype, config=None, kernel=None, V=None) -> dict:
    """The op's primal and gradient programs as jaxprs, on check_gpu's inputs (K = D, V = `V`,
    default D: Gated DeltaNet's layer has V = 2 K). `kernel` (a
    backend, delta-rule ops only): that kernel's entry called directly, past the registry's
    `accepts` and its choice, to bisect a kernel the op would not pick or declines at these
    shapes (gated_delta_rule's Triton kernels at K = 256, where they once failed at launch)."""
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)          # noqa: E731
    V = V or D
    x = dict(q=f(B, T, H, D), k=f(B, T, H, D), v=f(B, T, H, V),
             S0=jnp.zeros((B, H, D, V), jnp.float32))
    gate = {"simple_gla": (B, T, H), "gla": (B, T, H, D), "gated_delta_rule": (B, T, H),
            "kda": (B, T, H, D)}.get(op)
    if gate is not None:
        x["g"] = -jnp.ones(gate, jnp.float32) / 8
    if op in check_gpu.DELTA:
        x["beta"] = jnp.full((B, T, H), 0.5, jnp.float32)
    seg = jnp.asarray(np.arange(T)[None].repeat(B, 0) // max(1, T // 3), jnp.int32)
    names = [n for n in ("q", "k", "v", "g", "beta", "S0") if n in x]

    if kernel is not None:
        if op not in check_gpu.DELTA:
            raise ValueError(f"kernel_bisect: --kernel is for the delta-rule ops "
                             f"{sorted(check_gpu.DELTA)}, got --op {op}")
        entry = next(k for k in registry.record(op).kernels if k.backend == kernel)
        # the config the registry would give it: the passed one, else its device default
        fn = registry.load(entry.fn)
        cfg = config or registry.load(entry.config).default(jax.devices()[0])

    def run(d):
        a = dict(x, **d)
        if kernel is not None:
            return fn(a["q"], a["k"], a["v"], a.get("g"), a["beta"], scale=D ** -0.5,
                      initial_state=a["S0"], segment_ids=seg, chunk_size=64, config=cfg)
        extra = (a["beta"],) if "beta" in a else ()
        return check_gpu.OPS[op](a["q"], a["k"], a["v"], a.get("g"), *extra,
                                 initial_state=a["S0"], segment_ids=seg, impl="pallas",
                                 config=config)

    def loss(d):
        o, S = run(d)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    d = {n: x[n] for n in names}
    return {"primal": jax.make_jaxpr(run)(d), "grad": jax.make_jaxpr(jax.grad(loss))(d)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    case_args(p, op="kda", ops=check_gpu.OPS, dtype="bfloat16", D=64)
    p.add_argument("--kernel", choices=["triton"],
                   help="call that kernel directly, past its op's accepts (delta-rule ops)")
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    print("device", dev.device_kind, "jax", jax.__version__)
    rows = []
    progs = programs(a.op, a.B, a.T, a.H, a.D, getattr(jnp, a.dtype), kernel=a.kernel, V=a.V)
    for phase, eqn, name, shapes in distinct_kernels(progs):
        t0 = time.perf_counter()
        try:
            compile_alone(eqn)
            err = None
        except Exception as e:  # noqa: BLE001 - a kernel that fails is this script's finding
            err = tail(e, 12)
        rows.append(dict(op=a.op, dtype=a.dtype, T=a.T, D=a.D, phase=phase, kernel=name,
                         inputs=shapes, ok=err is None, error=err,
                         seconds=round(time.perf_counter() - t0, 2)))
        print(f"{'ok  ' if err is None else 'FAIL'} {phase:<6} {name}  {' '.join(shapes)[:160]}"
              + (f"\n{err}" if err else ""), flush=True)
    bad = sum(not r["ok"] for r in rows)
    path = common.write_json(common.device_file("kernel_bisect"), rows,
                             op=a.op, dtype=a.dtype, failures=bad)
    print(f"{len(rows)} kernels, {bad} failed; wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
