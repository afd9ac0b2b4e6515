"""Per-kernel device time of a jitted function, read from a JAX profiler trace.

`kernel_times(f, x, reps)` runs `f(x)` `reps` times under `jax.profiler` and returns, for every
kernel the device ran, its mean microseconds per call of `f` (Pallas kernels appear under their
`pallas_call` name, XLA's under their fusion names). Empty when the trace holds no device plane
(the CPU backend), so callers can print the breakdown wherever it exists. `trace_times` gives the
host's events beside them (the runtime's dispatch, launches, waits), the same way.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

import jax


def trace_times(f, x, reps: int = 10) -> tuple[dict[str, float], dict[str, float]]:
    """({device kernel: mean us a call}, {host event: mean us a call}) of `reps` blocked calls
    f(x), each sorted by time, longest first (the trace's own start and stop left out)."""
    jax.block_until_ready(f(x))
    dev: dict[str, float] = collections.defaultdict(float)
    host: dict[str, float] = collections.defaultdict(float)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(reps):
                jax.block_until_ready(f(x))
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        for plane in jax.profiler.ProfileData.from_file(files[0]).planes if files else ():
            on_gpu = plane.name.startswith("/device:GPU")
            for line in plane.lines:
                if on_gpu and not line.name.startswith("Stream"):  # kernels run on the streams
                    continue
                for ev in line.events:
                    if not ev.name.startswith("$profiler"):
                        (dev if on_gpu else host)[ev.name] += ev.duration_ns / 1e3 / reps
    order = lambda t: dict(sorted(t.items(), key=lambda kv: -kv[1]))          # noqa: E731
    return order(dev), order(host)


def kernel_times(f, x, reps: int = 10) -> dict[str, float]:
    return trace_times(f, x, reps)[0]


def format_times(times: dict[str, float], top: int = 12) -> str:
    if not times:
        return "    (no device trace)"
    s = sum(times.values())
    rows = [f"    {us:9.1f} us  {100 * us / s:5.1f}%  {name[:90]}"
            for name, us in list(times.items())[:top]]
    return "\n".join(rows + [f"    {s:9.1f} us  total over {len(times)} kernels"])
