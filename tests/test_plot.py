"""experiments/plot.py: one line per run, each run its own colour, the panels in split order."""

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


def test_panels_order_a_mixed_length_split_by_its_shortest():
    """eval_len<lo>-<hi> (a test set of mixed lengths, the state-tracking protocol's) sits among
    the fixed lengths by its shortest, after the train and the plain eval splits."""
    recs = [{"step": 1, "split": s, "seed": "mean", "accuracy": 0.5}
            for s in ("eval_len256", "eval_len40-256", "train", "eval_len64", "eval")]
    assert [p[0] for p in plot.panels({"run": recs}, ["accuracy"])] == [
        "train", "eval", "eval_len40-256", "eval_len64", "eval_len256"]
