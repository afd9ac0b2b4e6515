"""Per-kernel device time of a jitted function, read from a JAX profiler trace.

`kernel_times(f, x, reps)` runs `f(x)` `reps` times under `jax.profiler` and returns, for every
kernel the device ran, its mean microseconds per call of `f` (Pallas kernels appear under their
`pallas_call` name, XLA's under their fusion names). Empty when the trace holds no device plane
(the CPU backend), so callers can print the breakdown wherever it exists.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

import jax


def kernel_times(f, x, reps: int = 10) -> dict[str, float]:
    jax.block_until_ready(f(x))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(reps):
                jax.block_until_ready(f(x))
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {}
        data = jax.profiler.ProfileData.from_file(files[0])
        total: dict[str, float] = collections.defaultdict(float)
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not line.name.startswith("Stream"):   # kernels run on the stream lines
                    continue
                for ev in line.events:
                    total[ev.name] += ev.duration_ns / 1e3 / reps
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def format_times(times: dict[str, float], top: int = 12) -> str:
    if not times:
        return "    (no device trace)"
    s = sum(times.values())
    rows = [f"    {us:9.1f} us  {100 * us / s:5.1f}%  {name[:90]}"
            for name, us in list(times.items())[:top]]
    return "\n".join(rows + [f"    {s:9.1f} us  total over {len(times)} kernels"])
