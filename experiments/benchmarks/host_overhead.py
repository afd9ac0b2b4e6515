"""Where a blocked call's time goes beyond the device's: ours against jax-linear-attention.

    python -m experiments.benchmarks.host_overhead [--op simple_gla] [--T 2048 8192] [--reps 200]

The anchors time each call blocked on the host (`sync`); the kernels' own time is the median of
back-to-back calls (`device`). Their difference is host work and latency: the jit dispatch, the
runtime's launch of each kernel (for a Mosaic GPU kernel also the host code that encodes its TMA
descriptors), and the wait for completion. For ours and for jla's program on the same inputs,
forward and forward + backward, this script measures, interleaving the two so that both see the
same machine:
  device     median ms of 10 back-to-back calls, synchronised once;
  sync       p10 / median / p90 ms of single calls, each blocked;
  enqueue    median ms until the call returns (the device idle before it): the host's share;
  kernels    the number of device kernels a call runs and their summed microseconds;
  host       the host-side profiler events of a blocked call, by name, mean us a call (top 14).
Also a one-element jitted add, the floor of any blocked call on this machine. Writes
benchmarks/results/host_overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks import kernel_checks as kc
from experiments.benchmarks import profile as kernel_profile
from linear_jax import ops


def host_events(f, args, reps: int = 20) -> tuple[dict, dict]:
    """({host event name: mean us a call}, {device kernel name: mean us a call}) of blocked
    calls f(*args) (`profile.trace_times`): the host's 14 longest, the device's 40 longest."""
    dev, host = kernel_profile.trace_times(lambda a: f(*a), args, reps)
    rounded = lambda t, n: {k: round(v, 1) for k, v in list(t.items())[:n]}   # noqa: E731
    return rounded(host, 14), rounded(dev, 40)


def measure(fns: dict, args, reps: int) -> dict:
    """The numbers of the docstring for each named function on the same arguments."""
    out = {n: {"device_ms": common.median_ms(f, *args, reps=20, inner=10)} for n, f in fns.items()}
    sync = {n: [] for n in fns}
    enq = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():                     # interleaved: the same machine for each
            t0 = time.perf_counter()
            r = f(*args)
            t1 = time.perf_counter()
            jax.block_until_ready(r)
            t2 = time.perf_counter()
            enq[n].append(t1 - t0)
            sync[n].append(t2 - t0)
    for n, f in fns.items():
        s = 1e3 * np.asarray(sync[n])
        out[n].update(sync_p10_ms=float(np.percentile(s, 10)), sync_ms=float(np.median(s)),
                      sync_p90_ms=float(np.percentile(s, 90)),
                      enqueue_ms=float(1e3 * np.median(enq[n])))
        host, dev = host_events(f, args)
        out[n].update(host_us=host, kernels=len(dev), kernels_us=round(sum(dev.values()), 1),
                      kernel_names=list(dev))
    return {n: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
            for n, r in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", default="simple_gla", choices=("simple_gla",))
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--reps", type=int, default=200)
    a = p.parse_args(argv)
    dev = jax.devices()[0]
    print("device", dev.device_kind, "jax", jax.__version__)
    x = jnp.ones((1,), jnp.float32)
    rows = [dict(T=0, phase="add", **measure({"add": jax.jit(lambda y: y + 1)}, (x,), a.reps))]
    print(rows[-1])
    for T in a.T:
        q, k, v, g, do = kc.timing_inputs(T, vector_gate=False)
        K = q.shape[-1]
        ours = kc.fwd_and_fwdbwd(lambda q, k, v, g: ops.simple_gla(
            q, k, v, g, scale=K**-0.5, chunk_size=64, impl="pallas")[0])
        peer = kc.jla_peer(a.op, lambda g: {"g": g})
        for i, phase in enumerate(("fwd", "fwdbwd")):
            fns = {"ours": ours[i]} | ({"jla": peer[i]} if peer else {})
            args = (q, k, v, g) if i == 0 else (q, k, v, g, do)
            rows.append(dict(T=T, phase=phase, **measure(fns, args, a.reps)))
            for n in fns:
                r = rows[-1][n]
                print(f"T={T} {phase:<6} {n:<4} device {r['device_ms']:.3f} sync "
                      f"{r['sync_p10_ms']:.3f}/{r['sync_ms']:.3f}/{r['sync_p90_ms']:.3f} enqueue "
                      f"{r['enqueue_ms']:.3f} ms; {r['kernels']} kernels {r['kernels_us']} us; "
                      f"host {r['host_us']}", flush=True)
    path = common.write_json(common.device_file("host_overhead"), rows)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
