"""Run a paper's experiment at its protocol: every cell of its grid, each cell's seeds trained
together (`linear_jax.training.seeds`), a JSON and a table of mean +- std per cell.

    python -m experiments.paper_protocols --protocol=state_tracking --out=runs/protocols
    python -m experiments.paper_protocols --protocol=mqar --cells=based-,gla- --out=runs/protocols
    python -m experiments.paper_protocols --protocol=icl_regression --quick --out=/tmp/p   # smoke

Protocols (their configs in `experiments/configs/`): `state_tracking` (paper_state_tracking.py,
Grazzi et al. 2025), `deltaproduct` (paper_deltaproduct.py, Siems et al. 2025: S3 and S5 with the
Householder steps per token swept), `mqar` (paper_mqar.py, Zoology; each cell the best of its
learning-rate sweep by mean eval accuracy, the sweep's rates trained together with the seeds),
`mamba_synthetic` (paper_mamba_synthetic.py, Gu & Dao 2023), `icl_regression`
(paper_icl_regression.py, von Oswald et al. 2023, each depth beside as many steps of GD) and
`lm_mixers` (lm_mixers.py, byte-level Shakespeare). `--cells` keeps the cells whose name contains
one of the given strings (one that starts with `^` must begin the name: `^attention-` keeps
`attention-d64-T256` but not `linear_attention-d64-T256`), so a grid can be run in parts; a cell
whose `result.json` holds the same config (but for its `workdir` and `model.impl`: where the run
was written and which implementation of the same function computed it) is reused, so an
interrupted run picks up where it stopped. Everything goes to
`<out>/<protocol>/`: a directory per run (metrics.jsonl, config.json, result.json),
`<protocol>.json` and `<protocol>.md`, rewritten after every cell.

`--collect` trains nothing: it writes the JSON and the table from the cells already finished under
`<out>/<protocol>/` (the same `--cells`, `--set` and `--steps` select them), for grids whose cells
ran as separate processes, each of which rewrites the summary with its own cells only. With
`--salvage=DEVICE[,PRECISION]` it first rebuilds the partial.json of runs that were killed before
they could write one (a lent machine taken back mid-run) from their metrics.jsonl, at the last
step every seed was evaluated (`salvage`; the table says "lost" where it says "cut" for a
deadline, and has no time for them).

`--lrs` trains a subset of a sweep's learning rates (the others are not run, and a cell's best is
then the best of those). `--deadline=S` stops training S seconds after the start, at the last
evaluation before it (`seeds.train_sweep`): the cut runs are written to `partial.json`, not
`result.json`, and the table marks them ("5000 of 25000, cut") where no finished run of the cell
exists. A later call resumes a cut run from its checkpoint (`<cell>/checkpoints`, saved at the
cut and every `train.checkpoint_every` steps by the configs that set it: the state-tracking,
DeltaProduct and Mamba synthetic ones), else trains it again from the start (and keeps the
earlier cut when its own stops at an earlier step).

`--cost` trains nothing either: it compiles each cell's train step (the lrs and seeds it would
train together) and prints XLA's cost analysis per step, FLOPs and bytes accessed, with the
protocol's total and the time the bytes alone would take at `--hbm-tbps` (default 3.35, an H100
SXM's HBM): a floor to plan device time by. On a CPU, XLA fuses less than on a GPU, so its bytes
overstate a GPU's; run it on the GPU for the GPU's fusions. A Pallas kernel's bytes are not in
XLA's count: `--time-steps=N` also runs the step (three rounds of N, the median) and gives the
measured ms per step and the protocol's time at it. The numbers go to
`<out>/<protocol>/<protocol>_cost_<platform>[_<key>-<value> per --set].json`.

`--quick` runs the protocol's first smoke cell at a toy size (a tiny model, 2 steps, 2 seeds): a
test that the grid's configs build and train, not a result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import time

# Columns: (label, where in result.json, metric); `select`: the column that picks a cell's lr;
# `best`: the table also shows the best seed's value (the paper reports its best of 3 runs).
PROTOCOLS = {
    "state_tracking": {
        "config": "paper_state_tracking", "quick_cell": "parity-mamba_11", "best": True,
        "columns": [("scaled acc. T in [40, 256]", ("eval", "eval_len40-256"),
                     "scaled_accuracy")] + [
            (f"scaled acc. T={t}", ("eval", s), "scaled_accuracy") for t, s in
            ((40, "eval"), (64, "eval_len64"), (128, "eval_len128"), (256, "eval_len256"))],
        "quick": {"task.seq_len": 12}, "curves": True},
    "deltaproduct": {
        "config": "paper_deltaproduct", "quick_cell": "s3-nh2", "best": True, "curves": True,
        "columns": [(f"scaled acc. T={t}", ("eval", s), "scaled_accuracy") for t, s in
                    ((128, "eval"), (256, "eval_len256"), (512, "eval_len512"))],
        "quick": {"task.seq_len": 12}},
    "mqar": {
        "config": "paper_mqar", "quick_cell": "based-d64-T256", "select": "accuracy",
        "plot": "state_size",
        "columns": [("accuracy", ("eval", "eval"), "accuracy")],
        "quick": {"task.seq_len": 32, "task.params": {"num_kv_pairs": 4}}},
    "mamba_synthetic": {
        "config": "paper_mamba_synthetic", "quick_cell": "induction_heads-s4d",
        "columns": [("accuracy (train length)", ("eval", "eval"), "accuracy")] + [
            (f"accuracy T={t}", ("eval", f"eval_len{t}"), "accuracy") for t in (512, 2048, 8192)],
        "quick": {"task.seq_len": 16}, "curves": True},
    "icl_regression": {
        "config": "paper_icl_regression", "quick_cell": "lsa",
        "columns": [("trained LSA, MSE", ("eval", "eval"), "loss"),
                    ("GD, one step per layer, MSE", ("baseline", "gd"), "loss"),
                    ("GD++, one step per layer, MSE", ("baseline", "gdpp"), "loss"),
                    ("predicting 0, MSE", ("baseline", "zero"), "loss")],
        "quick": {}},
    "lm_mixers": {
        "config": "lm_mixers", "quick_cell": "linear_attention",
        "columns": [("eval loss (nats/byte)", ("eval", "eval"), "loss")],
        "quick": {"task.seq_len": 32}, "curves": True},
}
QUICK = {"model.d_model": 16, "model.num_layers": 1, "train.steps": 2, "train.batch_size": 4,
         "train.warmup_steps": 1, "train.log_every": 1, "eval.every": 2, "eval.batches": 1,
         "eval.batch_size": 4, "eval.seq_lens": ()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.paper_protocols",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS))
    p.add_argument("--out", default="runs/protocols", help="output directory")
    p.add_argument("--cells", default="",
                   help="comma-separated substrings of cell names (^ anchors one at the start)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, trained together")
    p.add_argument("--steps", type=int, help="train.steps of every cell (default: the config's)")
    p.add_argument("--quick", action="store_true", help="one tiny cell (CPU smoke test)")
    p.add_argument("--lrs", default="",
                   help="comma-separated learning rates of the protocol's sweep to train")
    p.add_argument("--deadline", type=float,
                   help="seconds after the start at which training stops (cut runs: partial.json)")
    p.add_argument("--cost", action="store_true",
                   help="train nothing: each cell's train step's FLOPs and bytes (XLA's count)")
    p.add_argument("--hbm-tbps", type=float, default=3.35,
                   help="--cost: the HBM bandwidth (TB/s) its time floor is computed at")
    p.add_argument("--time-steps", type=int, default=0,
                   help="--cost: also time this many steps per round, three rounds (ms_per_step)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="--cost: also trace this many steps under jax.profiler: the device's "
                        "busy time and kernels per step beside the wall time (`trace`)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: summarise the cells already finished in --out")
    p.add_argument("--salvage", metavar="DEVICE[,PRECISION]",
                   help="--collect: first rebuild partial.json of runs killed without one (a "
                        "machine taken back) from their metrics.jsonl, recording that they ran "
                        "on DEVICE with float32 matmuls at PRECISION (`salvage`)")
    p.add_argument("--rebaseline", action="store_true",
                   help="--collect: first recompute the task's baselines of every finished run "
                        "(`evaluation.baseline`, per seed, on the run's own evaluation tasks) and "
                        "write them into its result: a baseline added later needs no retraining")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every cell, e.g. --set=model.impl=chunk (a "
                        "kernel that will not run vmapped) or --set=eval.batch_size=8")
    args = p.parse_args(argv)
    try:
        args.set = dict(_override(item) for item in args.set)
    except ValueError as e:
        p.error(str(e))
    args.seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    args.cells = [c for c in args.cells.split(",") if c]
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    args.deadline = None if args.deadline is None else time.monotonic() + args.deadline
    if (args.salvage or args.rebaseline) and not args.collect:
        p.error("--salvage and --rebaseline go with --collect")
    if args.quick:
        args.seeds = args.seeds[:2]
    return args


def _override(item: str):
    """"key=value" -> (key, value), the value a Python literal where it parses as one."""
    import ast

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text


def _set(config, dotted: str, value) -> None:
    import ml_collections

    *path, leaf = dotted.split(".")
    node = config
    for key in path:
        node = node[key]
    node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def _matches(cell: str, pattern: str) -> bool:
    return cell.startswith(pattern[1:]) if pattern.startswith("^") else pattern in cell


def cell_configs(args, module, protocol):
    """[(run name, config)] of the grid, the lr sweep expanded, `--cells` and `--quick` applied."""
    cells = [protocol["quick_cell"]] if args.quick else [
        c for c in module.CELLS if not args.cells or any(_matches(c, s) for s in args.cells)]
    sweep = getattr(module, "LRS", (None,))[:1 if args.quick else None]
    if args.lrs and not set(args.lrs) <= set(sweep):
        raise SystemExit(f"error: --lrs={args.lrs} must be among the sweep's {list(sweep)}")
    lrs = [lr for lr in sweep if not args.lrs or lr in args.lrs]
    out = []
    for cell in cells:
        for lr in lrs:
            c = module.get_config(cell)
            c.seeds = args.seeds
            overrides = {**QUICK, **protocol["quick"]} if args.quick else {}
            overrides.update(args.set)
            if args.steps:
                overrides["train.steps"] = args.steps
            if lr is not None:
                overrides["train.lr"] = lr
            for key, value in overrides.items():
                _set(c, key, value)
            name = cell + ("" if lr is None or len(sweep) == 1 else f"_lr{lr:g}")
            c.workdir = str(pathlib.Path(args.out) / args.protocol / name)
            out.append((cell, lr, c))
    return out


def _value(result, where, metric):
    """(mean, std, max) over the seeds."""
    node = result
    for key in where:
        node = node.get(key, {})
    return node.get(metric), node.get(f"{metric}_std"), node.get(f"{metric}_max")


def _as_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _identity(config: dict) -> dict:
    """What makes two runs the same experiment: the config but for where its files were written
    (a run done on a lent machine under another directory and brought back is the same run) and
    which implementation computed the mixer (`model.impl`: the kernels, the chunk form and the
    reference compute one function, tested against each other) or whether Based's Taylor map
    keeps each product of its quadratic block once (`compact`: the same phi(q) . phi(k), so the
    same function, in fewer state rows; `tests/layers/test_compact_features.py`), and how the
    test sequences were cut into batches: `eval.batch_size` x `eval.batches` sequences are the
    same test set size however they are cut (a long-sequence eval that runs out of memory beside
    other jobs is run in smaller batches; the draw then differs, the distribution and the count
    do not), or how often its checkpoints were saved (`train.checkpoint_every`,
    `train.keep_checkpoints`: where a cut run resumes from, not what it computes). An empty
    `eval.length_range` is the same as none, which runs made before it existed have."""
    config = {k: v for k, v in config.items() if k != "workdir"}
    config["train"] = {k: v for k, v in config.get("train", {}).items()
                       if k not in ("checkpoint_every", "keep_checkpoints")}
    config["model"] = {k: v for k, v in config.get("model", {}).items() if k != "impl"}
    if "mixer_options" in config["model"]:
        config["model"]["mixer_options"] = {
            m: {k: v for k, v in (o or {}).items() if k != "compact"}
            for m, o in config["model"]["mixer_options"].items()}
    ev = dict(config.get("eval", {}))
    if "batch_size" in ev and "batches" in ev:
        ev["sequences"] = ev.pop("batch_size") * ev.pop("batches")
    if not ev.get("length_range"):      # none, as in runs made before the field existed
        ev.pop("length_range", None)
    config["eval"] = ev
    return config


def _saved_as(config, name: str) -> dict | None:
    """`config.workdir / name` if it holds a run of this very config (`_identity`), else None."""
    path = pathlib.Path(config.workdir) / name
    if path.exists():
        previous = json.loads(path.read_text())
        if _identity(previous.get("config", {})) == _identity(_as_json(config)):
            return previous
    return None


def finished(config) -> dict | None:
    """The result.json of `config`'s run if it finished with this very config, else None."""
    return _saved_as(config, "result.json")


def _where() -> dict:
    """What the config does not say about how a run was computed: the device and the float32
    matmul precision (JAX_DEFAULT_MATMUL_PRECISION; None is JAX's default, TF32 on recent
    NVIDIA GPUs)."""
    import jax

    return {"device": jax.devices()[0].device_kind,
            "matmul_precision": jax.config.jax_default_matmul_precision}


def saved(config) -> dict | None:
    """The finished run of `config`, else a run of it cut by a deadline (`partial.json`)."""
    return finished(config) or _saved_as(config, "partial.json")


def rebaseline(config, result: dict) -> dict:
    """`result` (the saved run of `config`) with its baselines recomputed for its seeds, written
    back where it was read from (result.json, else partial.json)."""
    from linear_jax.training import evaluation, seeds

    seeds.attach_baselines(result, [evaluation.baseline(config, s) for s in result["seeds"]])
    name = "result.json" if finished(config) is not None else "partial.json"
    (pathlib.Path(config.workdir) / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


def salvage(config, where: dict) -> dict | None:
    """partial.json of a run killed before it could write one (a lent machine taken back mid-run:
    no deadline fired), rebuilt from its `metrics.jsonl` at the last step where every seed's
    every eval split was logged; its train values are those logged at or before that step.
    `where`: the device and matmul precision it ran with, which the metrics do not say. Not
    written where a result.json exists, where `config.json` is another config's, or where a
    partial.json got as far; returns what it wrote, else None."""
    workdir = pathlib.Path(config.workdir)
    metrics, stored = workdir / "metrics.jsonl", workdir / "config.json"
    if finished(config) or not metrics.exists() or not stored.exists():
        return None
    ran = json.loads(stored.read_text())             # the run's own config (its impl, workdir)
    if _identity(ran) != _identity(_as_json(config)):
        return None
    members = [*config.seeds, "mean"]
    logged: dict[tuple, dict] = {}                   # (step, split, seed) -> values
    for line in metrics.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            logged[r["step"], r["split"], r["seed"]] = {
                k: v for k, v in r.items() if k not in ("step", "split", "seed")}
    splits = sorted({sp for _, sp, _ in logged if sp != "train"})
    complete = [s for s in sorted({s for s, sp, _ in logged if sp != "train"})
                if all((s, sp, m) in logged for sp in splits for m in members)]
    older = _saved_as(config, "partial.json")
    if not complete or (older is not None and older["step"] >= complete[-1]):
        return None
    step = complete[-1]
    train_at = max((s for s, sp, _ in logged if sp == "train" and s <= step), default=None)
    train = lambda m: logged.get((train_at, "train", m), {})
    result = {
        "seeds": list(config.seeds), "step": step, "train": train("mean"),
        "eval": {sp: logged[step, sp, "mean"] for sp in splits},
        "stopped": f"lost: killed after the evaluation at step {step} of "
                   f"{config.train.steps} (the machine went away); rebuilt from metrics.jsonl",
        "per_seed": [{"seed": s, "train": train(s), "stopped": None,
                      "eval": {sp: logged[step, sp, s] for sp in splits}}
                     for s in config.seeds],
        "partial": True, "lost": True, "seconds": None, "params": _num_params(config),
        **where, "config": ran}
    (workdir / "partial.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _num_params(config) -> int:
    """The model's parameter count, from shapes alone (nothing is initialised)."""
    import jax
    import numpy as np
    from flax import nnx

    from linear_jax.training import data, loop

    vocab = data.make_source(config.task, split="train", batch_size=1, seed=0).vocab_size
    model = nnx.eval_shape(loop.build_model(config.model, vocab, seed=0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def run_cell(configs, deadline=None) -> list[tuple[dict, bool]]:
    """(result.json's content, whether it was reused) of each run of one cell: its learning
    rates (one config each), the unfinished ones trained together with every seed
    (`seeds.train_sweep`); a run cut at `deadline` gives partial.json's content instead."""
    from linear_jax.training import seeds

    previous = [finished(c) for c in configs]
    todo = [c for c, p in zip(configs, previous, strict=True) if p is None]
    cut_before = {}            # workdir: (an earlier cut run, its metrics.jsonl)
    for c in todo:
        workdir = pathlib.Path(c.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        older, metrics = _saved_as(c, "partial.json"), workdir / "metrics.jsonl"
        if older is not None and metrics.exists():
            cut_before[c.workdir] = (older, metrics.read_bytes())
        (workdir / "config.json").write_text(json.dumps(_as_json(c), indent=2) + "\n")
    # a cut run whose checkpoint is there resumes from it (seeds.py); one of another config is
    # removed (the cell's workdir is the protocol's own)
    trained = iter(seeds.train_sweep(todo, todo[0].seeds, deadline=deadline,
                                      fresh_if_stale=True) if todo else [])
    out = []
    for c, p in zip(configs, previous, strict=True):
        if p is not None:
            out.append((p, True))
            continue
        result = {**next(trained), **_where(), "config": _as_json(c)}
        older, metrics = cut_before.get(c.workdir, (None, None))
        if result.get("partial") and older is not None and older["step"] >= result["step"]:
            # an earlier call got further before its cut: keep that run and its metrics
            (pathlib.Path(c.workdir) / "metrics.jsonl").write_bytes(metrics)
            out.append((older, True))
            continue
        name = "partial.json" if result.get("partial") else "result.json"
        (pathlib.Path(c.workdir) / "partial.json").unlink(missing_ok=True)
        (pathlib.Path(c.workdir) / name).write_text(json.dumps(result, indent=2) + "\n")
        out.append((result, False))
    return out


def record(protocol, cell, lr, result, workdir: str) -> dict:
    # the rate the run trained at, swept or not (a `--set=train.lr=...` run reads as such)
    lr = result["config"]["train"]["lr"] if lr is None else lr
    row = {"cell": cell, "lr": lr, "params": result["params"], "steps": result["step"],
           "of": result["config"]["train"]["steps"], "partial": result.get("partial", False),
           "seconds": None if result["seconds"] is None else round(result["seconds"], 1),
           "lost": result.get("lost", False), "stopped": result["stopped"],
           "seeds": result["seeds"], "workdir": workdir,
           "impl": result["config"]["model"].get("impl"), "device": result.get("device"),
           "matmul_precision": result.get("matmul_precision")}
    for label, where, metric in protocol["columns"]:
        row[label] = _value(result, where, metric)
    return row


def best_per_cell(rows: list[dict], select: str | None) -> list[dict]:
    """One row per cell: with a learning-rate sweep, the lr of the best mean `select` column
    (a finished run before any cut one)."""
    best = {}
    for r in rows:
        score = (not r.get("partial"),
                 r[select][0] if select and r[select][0] is not None else -1.0)
        if r["cell"] not in best or score > best[r["cell"]][0]:
            best[r["cell"]] = (score, r)
    return [r for _, r in best.values()]


def table(protocol, rows: list[dict]) -> str:
    """Mean ± std over the seeds per cell; with `best` (papers that report their best seed), the
    best seed's value in brackets."""
    labels = [c[0] for c in protocol["columns"]]

    def cell(v):
        if v[0] is None:
            return "—"
        best = f" ({v[2]:.4f})" if protocol.get("best") and v[2] is not None else ""
        return f"{v[0]:.4f} ± {v[1]:.4f}{best}"

    lines = ["| cell | lr | " + " | ".join(labels) + " | params | steps | time (s) |",
             "|---|---|" + "---|" * len(labels) + "---|---|---|"]
    for r in rows:
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        end = "lost" if r.get("lost") else "cut"
        steps = f"{r['steps']} of {r['of']}, {end}" if r.get("partial") else r["steps"]
        took = "—" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['cell']} | {lr} | " + " | ".join(cell(r[x]) for x in labels)
                     + f" | {r['params']:,} | {steps} | {took} |")
    return "\n".join(lines)


def plot_state_size(cells: list[dict], configs, out: pathlib.Path) -> list[pathlib.Path]:
    """Zoology's picture: per sequence length, `<protocol>_T<len>.png` with each mixer's accuracy
    against its recurrent state per layer (floats; attention: its KV cache at that length), one
    point per width; a run cut before its end (`partial`) is a hollow marker off the line,
    labelled with a star. `configs`: the grid's configs, the row's run found by its workdir."""
    from experiments import mqar_sweep
    from linear_jax.training import data

    by_workdir = {c.workdir: c for c in configs}
    points = {}
    for row in cells:
        config = by_workdir[row["workdir"]]
        vocab = data.make_source(config.task, split="train", batch_size=1, seed=0).vocab_size
        t = config.task.seq_len
        points.setdefault(t, []).append({
            "mixer": row["cell"].rsplit("-", 2)[0], "accuracy": row["accuracy"][0],
            "d_model": f"{config.model.d_model}{'*' if row.get('partial') else ''}",
            "cut": bool(row.get("partial")),
            "state_size": mqar_sweep.state_size_per_layer(config.model, vocab, t)})
    written = []
    for t, pts in sorted(points.items()):
        path = out / f"{out.name}_T{t}.png"
        mqar_sweep.plot(pts, path, f"MQAR, {t} tokens: best lr per cell, mean of the seeds "
                                   "(hollow, *: cut early)")
        written.append(path)
    return written


def plot_curves(protocol: dict, cells: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
    """The training curves of the protocol's metrics, each run the mean over its seeds, one
    figure per task (`<task>_curves.png`: the cells whose names share the part before the first
    "-", labelled by the rest) or, where the names have no "-", one for the protocol
    (`<protocol>_curves.png`); one panel per split. Cells without metrics are left out."""
    from experiments import plot
    from linear_jax.training.metrics import read_jsonl

    metrics = list(dict.fromkeys(metric for *_, metric in protocol["columns"]))
    groups: dict[str, dict] = {}
    for row in cells:
        task, _, rest = row["cell"].partition("-")
        group, label = (task, rest) if rest else (out.name, task)
        path = pathlib.Path(row["workdir"]) / "metrics.jsonl"
        if path.exists():
            groups.setdefault(group, {})[label + (" (cut)" if row["partial"] else "")] = (
                read_jsonl(path))
    written = []
    for group, runs in groups.items():
        path = out / f"{group}_curves.png"
        plot.plot(runs, path, metrics, title=f"{out.name}, {group}: mean of "
                                             f"{len(cells[0]['seeds'])} seeds")
        written.append(path)
    return written


def _by_cell(grid):
    """[(cell, [(lr, config), ...])] in grid order, a cell's learning rates together."""
    cells = {}
    for cell, lr, config in grid:
        cells.setdefault(cell, []).append((lr, config))
    return list(cells.items())


def cost(args, protocol_name: str, grid) -> dict:
    """--cost: per cell, the compiled train step's FLOPs and bytes (`seeds.step_cost`)."""
    import jax

    from linear_jax.training import seeds

    rows = []
    timed = " measured / step |" if args.time_steps else ""
    print("| cell | members | GFLOP / step | GB / step | steps | protocol TB | "
          f"HBM floor at {args.hbm_tbps:g} TB/s (s) |{timed}\n|---|---|---|---|---|---|---|"
          + "---|" * bool(timed))
    for name, runs in _by_cell(grid):
        configs = [config for _, config in runs]
        c = seeds.step_cost(configs, args.seeds, time_steps=args.time_steps,
                            trace=_profiler(args.profile) if args.profile else None)
        steps = configs[0].train.steps
        row = {"cell": name, **c, "steps": steps,
               "floor_s": steps * c["bytes_accessed"] / (args.hbm_tbps * 1e12)}
        if "ms_per_step" in c:
            row["measured_s"] = steps * c["ms_per_step"] / 1e3
        rows.append(row)
        measured = f" | {c['ms_per_step']:.2f} ms" if "ms_per_step" in c else ""
        if "trace" in c:
            t = c["trace"]
            print(f"{name}: {t['steps']} steps traced, {t['wall_ms']:.2f} ms a step of wall time, "
                  f"the device busy {t['device_ms']:.2f} ms in {t['kernels']} distinct kernels; "
                  f"longest:\n{t['top']}", flush=True)
        print(f"| {name} | {c['members']} | {c['flops'] / 1e9:.1f} | "
              f"{c['bytes_accessed'] / 1e9:.2f} | {steps} | "
              f"{steps * c['bytes_accessed'] / 1e12:.1f} | {row['floor_s']:.0f}{measured} |",
              flush=True)
    device = jax.devices()[0]
    out = {"protocol": protocol_name, "platform": device.platform, "device": device.device_kind,
           "jax": jax.__version__, "hbm_tbps": args.hbm_tbps, "seeds": list(args.seeds),
           "lrs": args.lrs, "set": args.set, "time_steps": args.time_steps,
           "profile": args.profile, "cells": rows}
    # runs of other overrides (model.impl=auto against chunk, say) keep files of their own
    tag = "".join(f"_{k.rsplit('.', 1)[-1]}-{v}" for k, v in sorted(args.set.items()))
    path = (pathlib.Path(args.out) / protocol_name /
            f"{protocol_name}_cost_{device.platform}{tag}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _profiler(steps: int):
    """`seeds.step_cost`'s trace: `steps` steps under jax.profiler (`benchmarks.profile`), the
    device's busy time a step (the sum of its kernels' times) against the wall time a step. Where
    the first is far below the second, the step waits on launches and the host, not arithmetic."""
    def trace(step, batch) -> dict:
        import time

        import jax

        from experiments.benchmarks import profile

        t0 = time.perf_counter()
        for _ in range(steps):                 # each step waited on, as the traced ones are
            jax.block_until_ready(step(batch))
        wall_ms = 1e3 * (time.perf_counter() - t0) / steps
        dev, host = profile.trace_times(step, batch, reps=steps)
        return {"steps": steps, "wall_ms": wall_ms, "device_ms": sum(dev.values()) / 1e3,
                "kernels": len(dev), "top": profile.format_times(dev),
                "kernel_us": dict(list(dev.items())[:20]),
                "host_us": dict(list(host.items())[:12])}
    return trace


def main(argv=None) -> dict:
    args = parse_args(argv)
    from absl import logging

    from linear_jax.training import checkpoint

    protocol = PROTOCOLS[args.protocol]
    module = importlib.import_module(f"experiments.configs.{protocol['config']}")
    grid = cell_configs(args, module, protocol)
    kept = {}
    if args.salvage:
        device, _, precision = args.salvage.partition(",")
        for *_, c in grid:
            if salvage(c, {"device": device, "matmul_precision": precision or None}):
                print(f"salvaged {pathlib.Path(c.workdir).name} from its metrics.jsonl")
    if args.collect:                       # {workdir: its saved run}, each read once
        kept = {c.workdir: saved(c) for _, _, c in grid}
        grid = [g for g in grid if kept[g[2].workdir] is not None]
    if args.rebaseline:
        for *_, c in grid:
            rebaseline(c, kept[c.workdir])
    if not grid:
        which = "finished cell" if args.collect else "cell"
        sys.exit(f"error: no {which} of {args.protocol} matches --cells={','.join(args.cells)}")
    if args.cost:
        return cost(args, args.protocol, grid)
    checkpoint.quiet_orbax_logs()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)    # one line per cell instead of the trainer's log
    out = pathlib.Path(args.out) / args.protocol
    summary = {"protocol": args.protocol, "seeds": list(args.seeds), "quick": args.quick,
               "runs": [], "cells": []}
    t0 = time.perf_counter()
    i = 0
    try:
        for name, runs in _by_cell(grid):
            results = ([(kept[c.workdir], True) for _, c in runs] if args.collect else
                       run_cell([c for _, c in runs], args.deadline))
            for (lr, config), (result, reused) in zip(runs, results, strict=True):
                i += 1
                row = record(protocol, name, lr, result, config.workdir)
                summary["runs"].append(row)
                summary["cells"] = best_per_cell(summary["runs"], protocol.get("select"))
                summary["seconds"] = round(time.perf_counter() - t0, 1)
                (out / f"{args.protocol}.json").write_text(json.dumps(summary, indent=2) + "\n")
                (out / f"{args.protocol}.md").write_text(table(protocol, summary["cells"]) + "\n")
                values = ", ".join(f"{k} {row[k][0]:.4f}" for k, *_ in protocol["columns"]
                                   if row[k][0] is not None)
                lr_text = "" if lr is None else f" lr={lr:g}"
                print(f"[{i}/{len(grid)}] {name}{lr_text}: {values}"
                      + (" (reused)" if reused else ""), flush=True)
    finally:
        logging.set_verbosity(verbosity)
    if protocol.get("plot") == "state_size":
        plot_state_size(summary["cells"], [c for _, _, c in grid], out)
    if protocol.get("curves"):
        plot_curves(protocol, summary["cells"], out)
    print(table(protocol, summary["cells"]))
    return summary


if __name__ == "__main__":
    main()
