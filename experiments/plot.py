"""Draw training curves from runs' `metrics.jsonl` into one PNG.

    python -m experiments.plot runs/mqar runs/mqar_gla --out=mqar.png
    python -m experiments.plot runs/parity_neg runs/parity_pos --metrics=accuracy --out=p.png
    python -m experiments.plot experiments/results/* --table     # final metrics, markdown

One panel per (split, metric) present in the runs (train loss, eval loss, eval accuracy,
eval_len256 accuracy, ...), one line per run, labelled with the run directory's name (or --labels).
A multi-seed run (`config.seeds`) is drawn by the mean over its seeds.
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402
from matplotlib import ticker  # noqa: E402

from linear_jax.training.metrics import read_jsonl  # noqa: E402

_OUT = flags.DEFINE_string("out", "curves.png", "Output PNG.")
_METRICS = flags.DEFINE_list("metrics", ["loss", "accuracy"], "Metrics to draw.")
_LABELS = flags.DEFINE_list("labels", None, "One label per run (default: directory names).")
_TITLE = flags.DEFINE_string("title", None, "Figure title.")
_TABLE = flags.DEFINE_bool("table", False, "Print a markdown table of the runs' final metrics "
                           "(from result.json and config.json) instead of plotting.")


def panels(runs: dict[str, list[dict]], metrics) -> list[tuple[str, str]]:
    """(split, metric) pairs present in any run: train first, then the eval splits."""
    found = {(r["split"], m) for recs in runs.values() for r in recs for m in metrics if m in r}
    # eval_len<T>, or eval_len<lo>-<hi> for a test set of mixed lengths: ordered by its shortest
    length = lambda split: (int(split[len("eval_len"):].split("-")[0])
                            if split.startswith("eval_len") else 0)
    order = lambda p: (p[0] != "train", length(p[0]), p[0], metrics.index(p[1]))
    return sorted(found, key=order)


def plot(runs: dict[str, list[dict]], out, metrics=("loss", "accuracy"), title=None) -> None:
    metrics = list(metrics)
    cells = panels(runs, metrics)
    if not cells:
        raise ValueError(f"none of the metrics {metrics} appear in the runs")
    cols = min(3, len(cells))
    rows = (len(cells) + cols - 1) // cols
    many = len(runs) > 10
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 2.5 * many, 3.2 * rows),
                             squeeze=False, layout="constrained" if many else None)
    # past the default cycle's 10 colours two runs would share one: 20 distinct ones instead
    colors = list(plt.cm.tab20.colors) if many else [None] * len(runs)
    for ax, (split, metric) in zip(axes.flat, cells, strict=False):
        for i, (label, recs) in enumerate(runs.items()):
            pts = [(r["step"], r[metric]) for r in recs
                   if r["split"] == split and r.get("seed", "mean") == "mean"
                   and isinstance(r.get(metric), (int, float))]
            if pts:
                marker = None if split == "train" else "."
                ax.plot(*zip(*pts, strict=True), label=label, marker=marker,
                        color=colors[i % len(colors)])
        ax.set_title(f"{split} {metric}")
        ax.set_xlabel("step")
        if metric == "loss":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
            low, high = ax.get_ylim()
            # minor labels only within one decade: over several they overprint each other
            ax.yaxis.set_minor_formatter(ticker.ScalarFormatter() if high <= 10 * low
                                         else ticker.NullFormatter())
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    if many:                        # a long legend beside the panels, not over the curves
        fig.legend(*axes.flat[0].get_legend_handles_labels(), fontsize=7, loc="outside right")
    else:
        axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    if not many:
        fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(dirs) -> str:
    """One row per run: task, mixer, parameters, steps, seconds, final eval metrics."""
    rows = ["| run | task | mixer | params | steps | time (s) | final eval |",
            "|---|---|---|---|---|---|---|"]
    for d in dirs:
        result = json.loads((d / "result.json").read_text())
        config = json.loads((d / "config.json").read_text())
        evals = "; ".join(f"{name}: loss {m['loss']:.4f}" + (
            f", acc {m['accuracy']:.4f}" if "accuracy" in m else "")
            for name, m in result["eval"].items())
        rows.append(f"| {d.name} | {config['task']['name']} | {config['model']['mixer']} | "
                    f"{result['params']:,} | {result['step']} | {result['seconds']:.0f} | "
                    f"{evals} |")
    return "\n".join(rows)


def main(argv) -> None:
    dirs = [pathlib.Path(a) for a in argv[1:]]
    if not dirs:
        raise app.UsageError("give one or more run directories (each with metrics.jsonl)")
    if _TABLE.value:
        print(table(dirs))
        return
    labels = _LABELS.value or [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise app.UsageError(f"{len(labels)} labels for {len(dirs)} runs")
    runs = {lab: read_jsonl(d / "metrics.jsonl" if d.is_dir() else d) for lab, d in
            zip(labels, dirs, strict=True)}
    plot(runs, _OUT.value, _METRICS.value, _TITLE.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
