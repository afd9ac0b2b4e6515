"""experiments/plot.py draws one line per run, each run its own colour."""

from __future__ import annotations

import matplotlib.colors as mcolors
import pytest

from experiments import plot


@pytest.mark.parametrize("n", [3, 13])
def test_every_run_gets_its_own_colour(tmp_path, monkeypatch, n):
    runs = {f"run{i}": [{"step": s, "split": split, "seed": "mean", "accuracy": 0.1 * i + s}
                        for s in (1, 2) for split in ("train", "eval")] for i in range(n)}
    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)
    plot.plot(runs, tmp_path / "c.png", metrics=("accuracy",))
    assert (tmp_path / "c.png").stat().st_size > 0
    (fig,) = figures
    for ax in fig.axes[:2]:
        colours = {mcolors.to_hex(line.get_color()) for line in ax.get_lines()}
        assert len(ax.get_lines()) == n and len(colours) == n
