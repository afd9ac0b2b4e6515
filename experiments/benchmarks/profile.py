"""Per-kernel device time of a jitted function, read from a JAX profiler trace.

`kernel_times(f, x, reps)` runs `f(x)` `reps` times under `jax.profiler` and returns, for every
kernel the device ran, its mean microseconds per call of `f` (Pallas kernels appear under their
`pallas_call` name, XLA's under their fusion names). Empty when the trace holds no device plane
(the CPU backend), so callers can print the breakdown wherever it exists. `trace_times` gives the
host's events beside them (the runtime's dispatch, launches, waits), the same way.
`fusion_text(hlo, names)` finds what those fusion names are: their instructions in the compiled
module's text, shapes and fused computations.
"""

from __future__ import annotations

import collections
import glob
import os
import re
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


def fusion_text(hlo: str, names, lines: int = 40) -> str:
    """The instruction that calls each fusion of `names` (profile names: an XLA fusion's kernel
    is named after its instruction) in the optimized HLO text `hlo` (`compiled.as_text()`), with
    the first `lines` lines of the computation it calls: which ops of the program a slow
    fusion holds, and at what shapes."""
    out = []
    for name in names:
        call = re.search(rf"^\s*(ROOT )?%?{re.escape(name)} = .*$", hlo, re.M)
        if call is None:
            continue
        out.append(f"--- {name}: {call.group(0).strip()[:400]}")
        callee = re.search(r"calls=(%?[\w.\-]+)", call.group(0))
        if callee:
            body = re.search(rf"^{re.escape(callee.group(1))} .*?^}}", hlo, re.M | re.S)
            if body:
                out += [ln[:300] for ln in body.group(0).splitlines()[:lines]]
    return "\n".join(out)
