"""Metrics: JSON lines on disk, a progress bar or log lines, throughput, and fetching one step late.

`metrics.jsonl` holds one object per logged event: `{"step", "split": "train" | "eval" | ...,
metric: value, ...}`. On resume the lines past the restored step are dropped, so a resumed run's
file reads like an uninterrupted run's. `Lagged` holds the device arrays of step s until step s + 1
has been dispatched, then reads them: the host never blocks the device queue on a step in flight.
`Throughput` turns the loop's iteration times into step time, tokens/s and model FLOPs
utilisation (MFU: tokens/s x training FLOPs per token / the devices' peak, see
`linear_jax.models.flops`).
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
from tqdm import tqdm


class JsonlWriter:
    """Appends records to `path`; only process 0 writes (every host computes the same values).
    With `tensorboard` (a directory) every record is also written there as TensorBoard scalars
    `<split>/<metric>` (`linear_jax.training.tensorboard`, no TensorFlow needed)."""

    def __init__(self, path, *, resume_step: int | None = None, tensorboard=None):
        self.path = pathlib.Path(path)
        self.enabled = jax.process_index() == 0
        self.events = None
        if not self.enabled:
            return
        if tensorboard is not None:
            from linear_jax.training.tensorboard import EventWriter

            self.events = EventWriter(tensorboard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split,
                  **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.events is not None:
            self.events.scalars(step, {f"{split}/{k}": record[k] for k in values
                                       if isinstance(record[k], (int, float))})


def _plain(v):
    v = np.asarray(v).item() if hasattr(v, "shape") or isinstance(v, np.generic) else v
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def read_jsonl(path, split: str | None = None) -> list[dict]:
    lines = pathlib.Path(path).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


class Lagged:
    """push(step, device metrics) returns the previous step's metrics as Python floats."""

    def __init__(self):
        self._pending = None

    def push(self, step: int, metrics) -> tuple[int, dict] | None:
        previous, self._pending = self._pending, (step, metrics)
        return None if previous is None else _fetch(previous)

    def flush(self) -> tuple[int, dict] | None:
        previous, self._pending = self._pending, None
        return None if previous is None else _fetch(previous)


def _fetch(item):
    step, metrics = item
    return step, {k: float(v) for k, v in jax.device_get(metrics).items()}


class Throughput:
    """Step time and tokens/s over the steps since the last report, from the wall time of the
    loop's iterations (`add`), evaluations and checkpoint saves left out.

    An iteration dispatches a step and fetches the metrics of the one before (`Lagged`), so in
    steady state it lasts one step of whichever is slower, the device or the host: the mean over
    a window is the run's throughput. The time between two fetches is not: at an eval the last
    two steps are fetched back to back, a near-zero interval (the issue's 3.4e8 tokens/s). A
    report over an empty window (two reports in one iteration) repeats the previous one."""

    def __init__(self, tokens_per_step: int, flops_per_token: float | None = None,
                 peak_flops: float | None = None):
        self.tokens_per_step, self.flops_per_token, self.peak = (tokens_per_step,
                                                                 flops_per_token, peak_flops)
        self._seconds, self._steps, self._last = 0.0, 0, None
        self.total_seconds, self.total_steps = 0.0, 0

    def add(self, seconds: float, steps: int = 1) -> None:
        self._seconds += seconds
        self._steps += steps
        self.total_seconds += seconds
        self.total_steps += steps

    def _rates(self, seconds: float, steps: int) -> dict:
        step_time = seconds / steps
        out = {"step_time_s": step_time, "tokens_per_s": self.tokens_per_step / step_time}
        if self.flops_per_token and self.peak:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / self.peak
        return out

    def report(self) -> dict:
        """{"step_time_s", "tokens_per_s"[, "mfu"]} over the window, which then restarts."""
        if self._steps and self._seconds > 0:
            self._last = self._rates(self._seconds, self._steps)
            self._seconds, self._steps = 0.0, 0
        return dict(self._last or {})

    def overall(self) -> dict:
        """The same over every step timed so far."""
        if not self.total_steps or self.total_seconds <= 0:
            return {}
        return self._rates(self.total_seconds, self.total_steps)


class Progress:
    """A tqdm bar with the loss and tokens/s; shown by process 0 only."""

    def __init__(self, start: int, total: int, *, enabled: bool = True):
        self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         disable=not enabled or jax.process_index() != 0)
        self._rate = None

    def update(self, step: int, metrics: dict) -> None:
        """Advances to `step` (1-based count of finished steps); tokens/s as last reported."""
        if "tokens_per_s" in metrics:
            self._rate = f"{metrics['tokens_per_s']:,.0f}"
        post = {"loss": f"{metrics['loss']:.4f}"} | ({"tok_s": self._rate} if self._rate else {})
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def log_line(step: int, total: int, m: dict) -> str:
    """The line a run without a progress bar prints every `log_every` steps."""
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
    if "lr" in m:
        parts.append(f"lr {m['lr']:.3g}")
    if "tokens_per_s" in m:
        parts += [f"{m['tokens_per_s']:,.0f} tok/s", f"step {1e3 * m['step_time_s']:.1f} ms"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    return ", ".join(parts)
