"""What every benchmark script shares: timing, the machine's two ceilings, floors, JSON output.

A floor is the larger of two times: the fewest bytes the op must move (every input read once, every
output written once) over the measured memory bandwidth, and the FLOPs of the algorithm over the
measured matrix rate. Measured time over the floor is the gap left.

A sweep times one op under several kernel configs: `run_variant` builds each variant's config
from a base config (`dataclasses.replace(base, **over)`), hands it to the measurement, which passes
it to the op as `config=`, and returns the measurement or the exception it raised. Nothing global
changes between variants.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")


def median_ms(f, *args, reps: int = 10, warmup: int = 2, inner: int = 1) -> float:
    """Median ms per call over `reps` timings of `inner` back-to-back calls, synchronised once.

    inner=1 times each call to its result on the host; inner > 1 keeps the device busy between
    calls (device time, as triton's do_bench measures)."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return 1e3 * float(np.median(times))


def sync_ms(fns, *args, reps: int = 60, warmup: int = 2) -> list[float]:
    """Median ms of single calls, each blocked on the host, for each of `fns` on the same
    arguments, the functions' calls interleaved: the host's and the device's state (clocks,
    caches, other processes) drifts over a run, and alternating keeps that drift out of the
    comparison."""
    for f in fns:
        for _ in range(warmup):
            jax.block_until_ready(f(*args))
    times = [[] for _ in fns]
    for _ in range(reps):
        for t, f in zip(times, fns, strict=True):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            t.append(time.perf_counter() - t0)
    return [1e3 * float(np.median(t)) for t in times]


def time_fwd_bwd(row: dict, fwd, fwd_bwd, *args, reps: int) -> dict:
    """row["fwd_ms"], then row["fwdbwd_ms"]: median ms of fwd(*args) and of fwd_bwd(*args) (if
    the second raises, the row keeps the first)."""
    row["fwd_ms"] = median_ms(fwd, *args, reps=reps)
    row["fwdbwd_ms"] = median_ms(fwd_bwd, *args, reps=reps)
    return row


def run_variant(base, over: dict, measure):
    """measure(config) with config = dataclasses.replace(base, **over), `base` a kernel config
    (`linear_jax.kernels.configs`) that the caller passes on to the op as `config=`: (its result,
    None), or (None, the exception) when it raised, e.g. a config that does not compile or an impl
    out of memory, so that one variant's failure is recorded and the sweep goes on. A field the
    config does not have raises here: a sweep naming it is the script's mistake."""
    config = dataclasses.replace(base, **over)
    try:
        return measure(config), None
    except Exception as e:  # noqa: BLE001 - any failure is the variant's result
        return None, e


def compile_seconds(f, *args) -> float:
    t0 = time.perf_counter()
    f.lower(*args).compile()
    return time.perf_counter() - t0


def measure_ceilings(n_bytes: int = 1 << 27, n: int = 2048) -> dict:
    """Bandwidth (bytes read + written per s) of a large copy, FLOP/s of a float32 matmul."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    bw = 2 * n_bytes / (median_ms(copy, x, reps=5) / 1e3)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    flops = 2 * n**3 / (median_ms(mm, a, reps=5) / 1e3)
    return {"bytes_per_s": bw, "flop_per_s": flops}


def decay_family_cost(B, T, H, K, V, C, gate: str, itemsize: int = 4) -> dict:
    """Bytes and FLOPs of one chunked forward pass (gate: none | scalar | vector)."""
    g_elems = {"none": 0, "scalar": B * T * H, "vector": B * T * H * K}[gate]
    moved = itemsize * (B * T * H * (2 * K + 2 * V) + g_elems)        # q, k, v, g in; o out
    flops = 2 * B * H * T * (C * K + C * V + 2 * K * V)   # intra qk, Av; inter qS, k^T v
    return {"bytes": moved, "flops": flops}


def floor_ms(cost: dict, ceilings: dict) -> float:
    return 1e3 * max(cost["bytes"] / ceilings["bytes_per_s"],
                     cost["flops"] / ceilings["flop_per_s"])


def device_file(stem: str) -> str:
    """The result file's name for this device: <stem>_<device kind, spaces as _>.json."""
    return f"{stem}_{jax.devices()[0].device_kind.replace(' ', '_')}.json"


def write_json(name: str, rows: list, **meta) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    dev = jax.devices()[0]
    payload = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        **meta,
        "rows": rows,
    }
    tag = os.environ.get("RESULTS_TAG")      # a run split in phases keeps each phase's file
    if tag:
        stem, ext = os.path.splitext(name)
        name = f"{stem}_{tag}{ext}"
    path = os.path.normpath(os.path.join(RESULTS, name))
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path
