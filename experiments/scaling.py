"""Train several model sizes on one task and fit a power law of the final eval loss in parameters.

    python -m experiments.scaling --config=experiments/configs/lm_shakespeare.py \\
        --sizes=32x2,64x2,96x3,128x4 --config.train.steps=600 --workdir=runs/scaling

Each size `WIDTHxLAYERS` sets `model.d_model` and `model.num_layers` (everything else from the
config) and trains in `<workdir>/d<WIDTH>_l<LAYERS>` (an existing run resumes or is reused). The
fit is least squares in log-log space, `loss = a * params^b`, with numpy; the results (sizes,
parameter counts, losses, a, b) go to `<workdir>/scaling.json` and the plot to
`<workdir>/scaling.png`. `--table=<workdir>/scaling.json` prints a finished sweep as markdown.
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from matplotlib import ticker  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from linear_jax.training import loop  # noqa: E402
from linear_jax.training.mesh import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Task config file.")
_SIZES = flags.DEFINE_list("sizes", ["32x2", "64x2", "96x3", "128x4"], "WIDTHxLAYERS, ...")
_WORKDIR = flags.DEFINE_string("workdir", "runs/scaling", "Parent directory of the runs.")
_TABLE = flags.DEFINE_string("table", None, "Print the markdown table of this scaling.json "
                             "(sizes, parameters, eval losses, the fit) and exit.")


def fit_power_law(params, losses) -> tuple[float, float]:
    """(a, b) of loss = a * params**b, by least squares on logs."""
    b, log_a = np.polyfit(np.log(np.asarray(params, float)), np.log(np.asarray(losses, float)), 1)
    return float(np.exp(log_a)), float(b)


def plot(points, a, b, out, title) -> None:
    n = np.array([p["params"] for p in points], float)
    loss = np.array([p["eval_loss"] for p in points])
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(n, loss, "o", label="runs")
    ax.loglog(grid, a * grid ** b, "--", label=f"{a:.3g} N^{b:.3f}")
    for p in points:
        ax.annotate(p["size"], (p["params"], p["eval_loss"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    for axis in (ax.yaxis,):                  # plain numbers: the losses span under a decade
        axis.set_major_formatter(ticker.ScalarFormatter())
        axis.set_minor_formatter(ticker.ScalarFormatter())
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final eval loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    fit = summary["fit"]
    rows = ["| size (width x layers) | params | final eval loss (nats/byte) |", "|---|---|---|"]
    rows += [f"| {p['size']} | {p['params']:,} | {p['eval_loss']:.4f} |"
             for p in summary["points"]]
    rows.append(f"\n{summary['task']} with {summary['mixer']}, {summary['steps']} steps each; "
                f"fit: eval loss = {fit['a']:.3f} * params^{fit['b']:.4f}")
    return "\n".join(rows)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _TABLE.value:
        print(table(json.loads(pathlib.Path(_TABLE.value).read_text())))
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    root, points = pathlib.Path(_WORKDIR.value), []
    for size in _SIZES.value:
        width, layers = (int(x) for x in size.split("x"))
        config = _CONFIG.value.copy_and_resolve_references()
        config.model.d_model, config.model.num_layers = width, layers
        config.workdir = str(root / f"d{width}_l{layers}")
        logging.info("size %s -> %s", size, config.workdir)
        try:
            result = loop.train(config)
        except ConfigError as e:
            raise SystemExit(f"error: size {size}: {e}") from None
        if result["stopped"] or "eval" not in result["eval"]:
            raise SystemExit(f"error: size {size} did not finish ({result['stopped']})")
        points.append({"size": size, "params": result["params"],
                       "eval_loss": result["eval"]["eval"]["loss"], "workdir": config.workdir})
        print(f"{size}: {result['params']:,} parameters, eval loss "
              f"{points[-1]['eval_loss']:.4f}")
    a, b = fit_power_law([p["params"] for p in points], [p["eval_loss"] for p in points])
    summary = {"task": _CONFIG.value.task.name, "mixer": _CONFIG.value.model.get("mixer"),
               "steps": _CONFIG.value.train.steps, "fit": {"a": a, "b": b,
               "form": "eval_loss = a * params**b"}, "points": points}
    (root / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(points, a, b, root / "scaling.png",
         f"{summary['task']} ({summary['mixer']}), {summary['steps']} steps")
    print(f"fit: eval_loss = {a:.4g} * params^{b:.4f}; wrote {root / 'scaling.json'}, "
          f"{root / 'scaling.png'}")


if __name__ == "__main__":
    app.run(main)
