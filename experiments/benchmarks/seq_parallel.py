"""Sequence-parallel ops (`linear_jax.parallel`) against the single-device op: weak and strong
scaling, and the all-gathers alone.

    python -m experiments.benchmarks.seq_parallel [--devices 2] [--quick] [--compare]

Op level, B=1, H=16, K=V=128, bf16 inputs by default. For every op:
  weak    t_1(T_loc) on one device vs t_P(P T_loc) on P devices, T_loc in --weak
          (efficiency t_1 / t_P, 1 is perfect);
  strong  t_1(T) vs t_P(T), T in --strong (speedup t_1 / t_P, P is perfect);
  comm    the forward all-gather (M, N and segment ends packed) and the backward one (D) alone,
          at the sizes the op sends; their share of t_P is the communication cost.
Forward and forward+backward (grad of sum(o) w.r.t. every float input) are timed separately.
`--compare` adds the other backward modes ("rerun", "autodiff") and, for the decay family, the
other staging ("gemm" vs "zeco"). `--quick` runs on simulated CPU devices at tiny sizes.
Writes benchmarks/results/seq_parallel_<device>.json.
"""

from __future__ import annotations

import sys

if "--quick" in sys.argv:  # before jax is imported: simulated devices for the CPU smoke run
    import os

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from experiments.benchmarks import common  # noqa: E402
from linear_jax import (
    _compat,  # noqa: E402
    ops,  # noqa: E402
)
from linear_jax import parallel as sp  # noqa: E402

DECAY = ("linear_attention", "simple_gla", "gla")
DELTA = ("delta_rule", "gated_delta_rule")


def inputs(op, B, T, H, K, V, dtype, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    logsig = lambda x: (-np.logaddexp(0.0, -x)).astype(np.float32)
    x = {"q": f(B, T, H, K), "k": unit(f(B, T, H, K)), "v": f(B, T, H, V)}
    if op == "simple_gla" or op == "gated_delta_rule":
        x["g"] = logsig(f(B, T, H) + 3.0)
    if op == "gla":
        x["g"] = logsig(f(B, T, H, K) + 3.0) / 4
    if op in DELTA:
        x["beta"] = 1 / (1 + np.exp(-f(B, T, H)))
    return {n: jnp.asarray(a, dtype if n in ("q", "k", "v") else jnp.float32)
            for n, a in x.items()}


def single(op):
    return getattr(ops, op)


def map_size(op, K):
    return {"linear_attention": 0, "simple_gla": 1, "gla": K}.get(op, K * K)


def timed(fn, x, reps):
    fwd = jax.jit(lambda x: fn(**x)[0])
    loss = lambda x: jnp.sum(fn(**x)[0].astype(jnp.float32))
    bwd = jax.jit(jax.grad(loss))
    return {"compile_s": common.compile_seconds(fwd, x),
            "fwd_ms": common.median_ms(fwd, x, reps=reps),
            "fwdbwd_ms": common.median_ms(bwd, x, reps=reps)}


def gather_ms(mesh, n, reps):
    """One all-gather of n float32 per device, jitted alone."""
    f = jax.jit(_compat.shard_map(lambda x: _compat.all_gather_same(x, "seq").sum(0), mesh=mesh,
                                  in_specs=P("seq"), out_specs=P()))
    x = jax.device_put(jnp.ones((mesh.shape["seq"] * n,), jnp.float32),
                       NamedSharding(mesh, P("seq")))
    return common.median_ms(f, x, reps=reps)


def collectives(fn, x):
    txt = jax.jit(jax.grad(lambda x: jnp.sum(fn(**x)[0].astype(jnp.float32)))).lower(
        x).compile().as_text()
    return {c: len(re.findall(rf"\b{c}(?:-start)?\(", txt))
            for c in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", default=list(DECAY + DELTA))
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--weak", type=int, nargs="+", default=[16384, 65536, 262144],
                   help="tokens per device")
    p.add_argument("--strong", type=int, nargs="+", default=[32768, 131072], help="total tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impl", default="auto")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--compare", action="store_true", help="also the other modes and stagings")
    p.add_argument("--quick", action="store_true", help="8 simulated CPU devices, tiny sizes")
    a = p.parse_args(argv)
    if a.quick:
        # chunk 16: on jax 0.10.2 CPU the backward of ops.gla at chunk_size=32 segfaults
        a.weak, a.strong = [1024], [2048]
        a.heads, a.dim, a.chunk, a.dtype, a.reps = 2, 16, 16, "float32", 5
    n_dev = len(jax.devices())
    if a.devices > n_dev:
        raise SystemExit(f"--devices {a.devices} but only {n_dev} devices are visible")
    Pn = a.devices
    mesh = sp.make_mesh({"seq": Pn})
    one = jax.devices()[0]
    B, H, K, V, dtype = a.batch, a.heads, a.dim, a.dim, jnp.dtype(a.dtype)
    shard = lambda x: {n: jax.device_put(t, NamedSharding(mesh, P(None, "seq")))
                       for n, t in x.items()}
    variants = [("saved", "auto")]
    if a.compare:
        variants += [("rerun", "auto"), ("autodiff", "auto")]
    rows = []
    for op in a.ops:
        base = single(op)
        spfn = getattr(sp, op)
        extra = [("saved", "gemm"), ("saved", "zeco")] if a.compare and op in DECAY else []
        sizes = [("weak", Pn * t) for t in a.weak] + [("strong", t) for t in a.strong]
        for scaling, T in sizes:
            T1 = T // Pn if scaling == "weak" else T
            x1 = jax.device_put(inputs(op, B, T1, H, K, V, dtype), one)
            t1 = timed(lambda **x: base(**x, chunk_size=a.chunk, impl=a.impl), x1, a.reps)
            del x1
            xP = shard(inputs(op, B, T, H, K, V, dtype))
            for mode, staging in variants + extra:
                kw = dict(mesh=mesh, chunk_size=a.chunk, impl=a.impl, mode=mode)
                if op in DECAY:
                    kw["staging"] = staging
                fn = lambda **x: spfn(**x, **kw)
                tP = timed(fn, xP, a.reps)
                row = {"op": op, "scaling": scaling, "P": Pn, "T": T, "T_loc": T // Pn,
                       "T_single": T1, "B": B, "H": H, "K": K, "V": V, "dtype": a.dtype,
                       "chunk_size": a.chunk, "impl": a.impl, "mode": mode, "staging": staging,
                       "single_fwd_ms": t1["fwd_ms"], "single_fwdbwd_ms": t1["fwdbwd_ms"],
                       **{f"sp_{k}": v for k, v in tP.items()},
                       "collectives_fwdbwd": collectives(fn, xP)}
                ratio = "efficiency" if scaling == "weak" else "speedup"
                row[f"fwd_{ratio}"] = t1["fwd_ms"] / tP["fwd_ms"]
                row[f"fwdbwd_{ratio}"] = t1["fwdbwd_ms"] / tP["fwdbwd_ms"]
                rows.append(row)
                print(f"{op:<17}{scaling:<7}P={Pn} T={T:<7} {mode:<9}{staging:<5} "
                      f"fwd {t1['fwd_ms']:8.2f} -> {tP['fwd_ms']:8.2f} ms  fwd+bwd "
                      f"{t1['fwdbwd_ms']:8.2f} -> {tP['fwdbwd_ms']:8.2f} ms  {ratio} "
                      f"{row[f'fwd_{ratio}']:.2f} / {row[f'fwdbwd_{ratio}']:.2f}", flush=True)
            del xP
        n_fwd = B * H * (K * V + map_size(op, K)) + 2 * B
        comm = {"op": op, "scaling": "comm", "P": Pn,
                "fwd_gather_floats": n_fwd, "bwd_gather_floats": B * H * K * V,
                "fwd_gather_ms": gather_ms(mesh, n_fwd, a.reps),
                "bwd_gather_ms": gather_ms(mesh, B * H * K * V, a.reps)}
        rows.append(comm)
        print(f"{op:<17}comm   P={Pn} all-gather fwd {comm['fwd_gather_ms']:.3f} ms, "
              f"bwd {comm['bwd_gather_ms']:.3f} ms", flush=True)
    kind = re.sub(r"[^a-z0-9]+", "_", one.device_kind.lower()).strip("_")
    name = f"seq_parallel_{'cpu_quick' if a.quick else kind}.json"
    path = common.write_json(name, rows, devices=Pn, args=vars(a))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
