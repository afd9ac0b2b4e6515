"""Metrics: JSON lines on disk, a progress bar, and fetching one step late.

`metrics.jsonl` holds one object per logged event: `{"step", "split": "train" | "eval" | ...,
metric: value, ...}`. On resume the lines past the restored step are dropped, so a resumed run's
file reads like an uninterrupted run's. `Lagged` holds the device arrays of step s until step s + 1
has been dispatched, then reads them: the host never blocks the device queue on a step in flight.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

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


class Progress:
    """A tqdm bar with the loss and tokens/s (input tokens / wall time between fetches); shown by
    process 0 only."""

    def __init__(self, start: int, total: int, *, enabled: bool = True):
        self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         disable=not enabled or jax.process_index() != 0)
        self._last = (start, time.perf_counter())

    def update(self, step: int, metrics: dict, tokens_per_step: int) -> float:
        """Advances to `step` (1-based count of finished steps); returns tokens/s."""
        prev_step, prev_t = self._last
        now = time.perf_counter()
        rate = (step - prev_step) * tokens_per_step / max(now - prev_t, 1e-9)
        self._last = (step, now)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)
        return rate

    def restart_clock(self) -> None:
        """Excludes the time since the last update (an eval, a save) from the next rate."""
        self._last = (self._last[0], time.perf_counter())

    def close(self) -> None:
        self._bar.close()
