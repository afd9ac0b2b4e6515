"""MQAR accuracy against recurrent state size, over token mixers and widths (the Zoology / Based
picture: Arora et al. 2023, *Zoology*; Arora et al. 2024, *Simple linear attention language models
balance the recall-throughput tradeoff*).

    python -m experiments.mqar_sweep --out=runs/mqar_sweep                # the default grid (a GPU)
    python -m experiments.mqar_sweep --quick --out=/tmp/mqar_quick        # CPU smoke test, < 60 s
    python -m experiments.mqar_sweep --mixers=gla,based --d_models=64,128 --steps=3000 --out=...
    python -m experiments.mqar_sweep --shard=0/4 --out=...   # and 1/4, 2/4, 3/4, all at once
    python -m experiments.mqar_sweep --collect --out=...     # then: the combined JSON and plot

Every cell (mixer, d_model) is one run of the ordinary training harness
(`linear_jax.training.loop.train`) on the config of `experiments/configs/mqar.py` with the task,
model and optimiser settings of the flags below, in `<out>/runs/<mixer>_d<d_model>[_lr<lr>]`;
with several `--lrs` a cell keeps its best learning rate, as Zoology does; `--ffn=none` drops the
blocks' MLP, as Zoology's MQAR models have none (with the MLP, softmax attention was measured to
stay on the plateau of answering the context's most frequent value: experiments/README.md). A
cell that already has its `result.json` for the same config is reused, so an interrupted sweep
picks up where it stopped. One line per cell is printed as it finishes; everything goes to
`<out>/mqar_sweep.json` (rewritten after every cell) and the plot to `<out>/mqar_sweep.png`.

Sharding: a small cell is mostly compilation, which runs on the host's CPUs, so several processes
sharing one GPU finish a grid sooner than one. `--shard=i/n` trains only the cells whose index in
the grid's order (mixer, then d_model, then lr; 0-based) is i mod n, and writes its records to
`<out>/mqar_sweep.shard<i>of<n>.json` only, so that concurrent shards never write the same file;
give each its share of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION). `--collect` then trains
nothing: it gathers every cell of the grid that has its `result.json` for the same config into
`mqar_sweep.json` and the plot, and lists the cells still missing (unfinished, or failed: a
shard's JSON holds its errors). A run with neither flag trains the whole grid, as before.

Cost: a cell is one compilation (about 5-15 s on an H100) plus its steps. Measured on one H100
(jax 0.11.2) with 300 steps per cell: 8-24 s per cell at d_model 64 and 8-49 s at 256
(linear_attention at 256 the slowest), and no mixer learned 32 pairs in 256 tokens in 300 steps;
the first five mixers' 20 cells at 1000 steps should take 6-9 minutes there, the default grid
(40 cells) about twice that. For a shorter sweep use
fewer steps, widths or mixers; `--quick` is a smoke test, not a result.

State size per layer: the number of float elements a layer carries from one token to the next, read
from the mixer's own decoding cache (`init_cache`, batch 1) without the short-convolution buffer
(nor RWKV-7's token shift): H K V for the linear-attention family (H F (V + 1) with a feature map of
width F and a normaliser: Based), H N P for Mamba-2 (and Mamba-3, plus its last key and value), H
K^2 for KDA and RWKV-7, L times the base layer's (plus a position) for the log-linear mixers (L
level states), and for softmax attention its KV cache at the training length, 2 T D.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pathlib
import re
import shutil
import sys
import time

# Everything that depends on a flag's value; flags left out take these (or --quick's).
FULL = {"mixers": "attention,linear_attention,gla,gated_deltanet,mamba2,kda,rwkv7,mamba3,"
                  "log_linear_mamba2,log_linear_gated_deltanet",
        "d_models": "32,64,128,256", "seq_len": 256, "num_kv_pairs": 32, "steps": 1000,
        "batch_size": 64, "lrs": "3e-3", "warmup_steps": 100, "eval_batches": 4,
        "eval_batch_size": 128, "num_layers": 2}
# impl per mixer, named where "auto" did not do when the sweep's runs were made: the GPU kernel of
# `linear_attention` asked for more shared memory than an H100 has at Based's feature width
# 1 + 16 + 16^2 = 273. The kernels now decline K past 256 and "auto" takes the chunk form there
# itself; the entry keeps the committed cells' configs, and so their reuse, as they were.
IMPL = {"based": "chunk"}
# the short-convolution buffers of a cache (RWKV-7's token shift is a width-2 one)
_CONV_KEYS = ("conv", "shift")
QUICK = {"mixers": "attention,linear_attention", "d_models": "16,32", "seq_len": 32,
         "num_kv_pairs": 4, "steps": 20, "batch_size": 16, "lrs": "3e-3", "warmup_steps": 5,
         "eval_batches": 1, "eval_batch_size": 16, "num_layers": 1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.mqar_sweep", description=(
        __doc__ or "").split("\n\n")[0], epilog=f"defaults: {FULL}; with --quick: {QUICK}")
    p.add_argument("--out", default="runs/mqar_sweep", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="a tiny grid and task (CPU smoke test, < 60 s); other flags still apply")
    p.add_argument("--mixers", help=f"comma-separated mixer names (default {FULL['mixers']})")
    p.add_argument("--d_models", help=f"comma-separated widths (default {FULL['d_models']})")
    p.add_argument("--lrs", help="comma-separated learning rates; a cell keeps its best")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--num_kv_pairs", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--warmup_steps", type=int)
    p.add_argument("--eval_batches", type=int)
    p.add_argument("--eval_batch_size", type=int)
    p.add_argument("--num_layers", type=int)
    p.add_argument("--num_heads", type=int, default=2)
    p.add_argument("--ffn", default="mlp", choices=("mlp", "none"),
                   help="the blocks' feed-forward: the SwiGLU MLP of configs/mqar.py, or none "
                        "(Zoology's MQAR models: mixer-only blocks)")
    p.add_argument("--conv_size", type=int, default=4,
                   help="short convolution width for the mixers that take `conv_size` (0: none)")
    p.add_argument("--init_std", type=float, default=0.02,
                   help="model.init_std; 0: d_model^-1/2 per cell (at small widths the GPT-2 "
                        "0.02 leaves gated mixers at chance for longer; experiments/README.md)")
    p.add_argument("--dtype", default="bfloat16", help="model compute dtype")
    p.add_argument("--impl", default=None,
                   help=f"op implementation for every mixer (default: auto, except {IMPL})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_devices", type=int, default=0,
                   help="train each cell on the first N devices (default 0: all of them)")
    p.add_argument("--progress", action="store_true", help="a tqdm bar inside every cell")
    p.add_argument("--keep_checkpoints", action="store_true",
                   help="keep every finished cell's checkpoints (default: deleted)")
    p.add_argument("--shard", help="i/n: train only the cells whose grid index is i mod n and "
                   "write <out>/mqar_sweep.shard<i>of<n>.json instead of the combined outputs")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: gather the finished cells (their result.json) into "
                        "mqar_sweep.json and the plot, listing the missing ones")
    args = p.parse_args(argv)
    if args.shard is not None:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", args.shard)
        if not m or int(m[1]) >= int(m[2]):
            p.error(f"--shard={args.shard!r}: expected i/n with 0 <= i < n, e.g. --shard=0/4")
        args.shard = (int(m[1]), int(m[2]))
        if args.collect:
            p.error("--shard and --collect exclude each other (collect after the shards)")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    args.d_models = [int(d) for d in args.d_models.split(",") if d.strip()]
    args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    if not (args.mixers and args.d_models and args.lrs):
        p.error("--mixers, --d_models and --lrs must each name at least one value")
    return args


def _takes(cls, name: str) -> bool:
    return any(name in inspect.signature(c.__init__).parameters
               for c in cls.__mro__ if "__init__" in c.__dict__)


def cell_config(args, mixer: str, d_model: int, lr: float, workdir: pathlib.Path):
    """The config of `experiments/configs/mqar.py` with this cell's settings."""
    import ml_collections

    from experiments.configs import mqar
    from linear_jax.layers import MIXERS

    c = mqar.get_config()
    c.seed, c.workdir = args.seed, str(workdir)
    c.task.seq_len = args.seq_len
    c.task.params = ml_collections.ConfigDict({"num_kv_pairs": args.num_kv_pairs})
    options = {}
    if mixer in MIXERS and args.conv_size and _takes(MIXERS[mixer], "conv_size"):
        options = {mixer: {"conv_size": args.conv_size}}
    c.model.update(mixer=mixer, d_model=d_model, num_layers=args.num_layers,
                   num_heads=args.num_heads, dtype=args.dtype,
                   init_std=args.init_std if args.init_std > 0 else d_model ** -0.5,
                   impl=args.impl or IMPL.get(mixer, "auto"))
    c.model.mixer_options = ml_collections.ConfigDict(options)   # replaced, not merged
    if args.ffn != "mlp":       # the default leaves the config (and so the reuse key) as it was
        c.model.update(ffn=args.ffn)
    c.train.update(steps=args.steps, batch_size=args.batch_size, lr=lr,
                   warmup_steps=min(args.warmup_steps, args.steps),
                   log_every=max(1, args.steps // 50), checkpoint_every=args.steps,
                   progress=args.progress)
    c.eval.update(every=args.steps, batches=args.eval_batches, batch_size=args.eval_batch_size,
                  seq_lens=())
    return c


def state_size_per_layer(model_config, vocab_size: int, seq_len: int) -> int:
    """Float elements of one layer's recurrent state (mean over layers): its decoding cache for
    one sequence of `seq_len` tokens, without the short-convolution buffer."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from linear_jax.training.loop import build_model

    model = nnx.eval_shape(build_model(model_config, vocab_size, seed=0))
    sizes = []
    for i in range(model.config.num_layers):
        mixer = model.layer_mixer(i)
        cache = jax.eval_shape(lambda m=mixer: m.init_cache(1, jnp.float32, max_len=seq_len))
        sizes.append(sum(math.prod(x.shape) for k, v in cache.items() if k not in _CONV_KEYS
                         for x in jax.tree.leaves(v) if jnp.issubdtype(x.dtype, jnp.floating)))
    return round(sum(sizes) / len(sizes))


def finished_record(config_json: dict, workdir: pathlib.Path) -> dict | None:
    """The record of `workdir/result.json` if that run had this config, else None."""
    done = workdir / "result.json"
    if done.exists():
        previous = json.loads(done.read_text())
        if previous.get("config") == config_json:
            return previous["record"]
    return None


def run_cell(args, mixer: str, d_model: int, lr: float, workdir: pathlib.Path,
             devices=None) -> dict:
    """Trains one cell (or reuses its finished result) and returns its record."""
    from linear_jax.training import data, loop
    from linear_jax.training.mesh import ConfigError

    config = cell_config(args, mixer, d_model, lr, workdir)
    config_json = json.loads(config.to_json_best_effort())
    record = {"mixer": mixer, "d_model": d_model, "lr": lr, "workdir": str(workdir)}
    previous = finished_record(config_json, workdir)
    if previous is not None:
        return {**previous, "reused": True}
    done = workdir / "result.json"
    if workdir.exists():
        shutil.rmtree(workdir)          # a different or unfinished run: start it afresh
    workdir.mkdir(parents=True)
    vocab = data.make_source(config.task, split="train", batch_size=1, seed=0).vocab_size
    try:
        record["state_size"] = state_size_per_layer(config.model, vocab, args.seq_len)
        result = loop.train(config, devices=devices)
    except ConfigError as e:
        return {**record, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - one failing cell (a kernel, memory) ends only itself
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return {**record, "error": f"{type(e).__name__}: {first}"}
    ev = result["eval"].get("eval", {})
    record.update(params=result["params"], steps=result["step"], stopped=result["stopped"],
                  seconds=round(result["seconds"], 1), accuracy=ev.get("accuracy"),
                  loss=ev.get("loss"))
    if not args.keep_checkpoints:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    done.write_text(json.dumps({"config": config_json, "record": record}, indent=2) + "\n")
    return record


def best_per_cell(records: list[dict]) -> list[dict]:
    """For each (mixer, d_model), the record of the learning rate with the best accuracy."""
    best = {}
    for r in records:
        key = (r["mixer"], r["d_model"])
        acc = r.get("accuracy")
        if key not in best or (acc is not None and acc > (best[key].get("accuracy") or -1.0)):
            best[key] = r
    return list(best.values())


def plot(cells: list[dict], out, title: str, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mixer in dict.fromkeys(c["mixer"] for c in cells):
        pts = sorted((c["state_size"], c["accuracy"], c["d_model"], bool(c.get("cut")))
                     for c in cells if c["mixer"] == mixer and c.get("accuracy") is not None)
        if not pts:
            continue
        # the line joins finished runs only: a run cut before its end is a hollow marker, so a
        # cell stopped early does not read as the trend
        done = [p for p in pts if not p[3]]
        (line,) = ax.plot([p[0] for p in done], [p[1] for p in done], marker="o", label=mixer)
        cut = [p for p in pts if p[3]]
        if cut:
            ax.plot([p[0] for p in cut], [p[1] for p in cut], ls="none", marker="o",
                    mfc="none", color=line.get_color())
        for x, y, d, _ in pts:
            ax.annotate(str(d), (x, y), fontsize=6, color=line.get_color(),
                        textcoords="offset points", xytext=(3, -8))
    if chance is not None:
        ax.axhline(chance, color="gray", lw=0.8, ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("recurrent state size per layer (floats; attention: KV cache)")
    ax.set_ylabel("MQAR eval accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _line(i: int, n: int, r: dict) -> str:
    head = f"[{i}/{n}] {r['mixer']:>16} d_model={r['d_model']:<4} lr={r['lr']:.0e}"
    if "error" in r:
        return f"{head}  error: {r['error']}"
    acc = "n/a" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
    tail = f" (stopped: {r['stopped']})" if r.get("stopped") else ""
    tail += " (reused)" if r.get("reused") else ""
    return (f"{head}  state/layer {r['state_size']:>9,}  params {r['params']:>9,}  "
            f"eval acc {acc}  {r['seconds']:.0f} s{tail}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from absl import logging

    from linear_jax.layers import MIXERS
    from linear_jax.training import checkpoint

    unknown = [m for m in args.mixers if m not in MIXERS]
    if unknown:
        sys.exit(f"error: unknown mixer(s) {unknown}; known: {sorted(MIXERS)}")
    checkpoint.quiet_orbax_logs()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)   # one line per run instead of the trainer's log
    try:
        return _sweep(args, jax)
    finally:                                 # a caller in the same process keeps its logs
        logging.set_verbosity(verbosity)


def _sweep(args, jax) -> dict:
    devices = jax.devices()[:args.num_devices] if args.num_devices else None
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [(m, d, lr) for m in args.mixers for d in args.d_models for lr in args.lrs]
    todo, json_path = range(len(grid)), out / "mqar_sweep.json"
    if args.shard:
        shard, n = args.shard
        todo, json_path = todo[shard::n], out / f"mqar_sweep.shard{shard}of{n}.json"
    device = (devices or jax.devices())[0]
    title = (f"MQAR: {args.num_kv_pairs} pairs in {args.seq_len} tokens, {args.num_layers} "
             f"layer{'s' if args.num_layers > 1 else ''}, {args.steps} steps")
    what = (f"collecting {len(grid)} runs" if args.collect else
            f"shard {shard}/{n}: {len(todo)} of {len(grid)} runs" if args.shard else
            f"{len(grid)} runs")
    print(f"{title}; {what} on {len(devices or jax.devices())} x {device.device_kind}",
          flush=True)
    summary = {"task": {"name": "mqar", "seq_len": args.seq_len,
                        "num_kv_pairs": args.num_kv_pairs},
               "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
               "device": device.device_kind, "jax": jax.__version__,
               "state_size": "float elements per layer carried between tokens (mixer cache "
                             "without the conv buffer; attention: KV cache at seq_len)",
               "runs": [], "cells": []}
    t0, missing = time.perf_counter(), []

    def save():                 # after every cell: a sweep cut short keeps what it finished
        summary["cells"] = best_per_cell([r for r in summary["runs"] if "error" not in r])
        if not args.collect:    # the collector's own wall time says nothing about the runs
            summary["seconds"] = round(time.perf_counter() - t0, 1)
        json_path.write_text(json.dumps(summary, indent=2) + "\n")

    for i in todo:
        mixer, d_model, lr = grid[i]
        name = f"{mixer}_d{d_model}" + (f"_lr{lr:g}" if len(args.lrs) > 1 else "")
        workdir = out / "runs" / name
        if args.collect:        # read only: a shard may still be writing this workdir
            config = cell_config(args, mixer, d_model, lr, workdir)
            record = finished_record(json.loads(config.to_json_best_effort()), workdir)
            if record is None:
                missing.append(name)
                continue
        else:
            record = run_cell(args, mixer, d_model, lr, workdir, devices)
        print(_line(i + 1, len(grid), record), flush=True)
        summary["runs"].append(record)
        save()
    if args.collect:
        summary["missing"] = missing
    save()
    if args.shard:
        print(f"done in {summary['seconds']:.0f} s; wrote {json_path}", flush=True)
        return summary
    # values are drawn from 4 x num_kv_pairs ids (linear_jax.training.synthetic.mqar)
    plot(summary["cells"], out / "mqar_sweep.png", title, chance=1 / (4 * args.num_kv_pairs))
    head = (f"collected {len(summary['runs'])} of {len(grid)} runs" if args.collect else
            f"done in {summary['seconds']:.0f} s")
    print(f"{head}; wrote {json_path} and {out / 'mqar_sweep.png'}", flush=True)
    if missing:
        print(f"{len(missing)} missing (not finished, or failed: see the shards' JSON): "
              f"{', '.join(missing)}", flush=True)
    return summary


if __name__ == "__main__":
    main()
