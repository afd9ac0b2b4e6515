"""Several seeds of one config trained together on one device: the train step vmapped over seeds.

    states = jit(vmap(init))(seeds)                       model and optimiser state per seed
    for each step: batches of every seed's own stream, stacked -> jit(vmap(train_step)) -> log
                   every `eval.every`: every seed on its own eval sets, vmapped

Seed s gets exactly what a single run with `config.seed = s` gets (`loop.train`): its
initialisation (`nnx.Rngs(s)`), its data stream and eval sets, its optimiser state; only the
batching differs, so each seed's losses are that run's to float32 rounding
(`tests/training/test_seeds.py`). A small model leaves most of a GPU idle, and one compiled step
for S seeds costs about what one seed does until the device fills up.

`metrics.jsonl` holds, per logged step and split, one record per seed (`"seed": s`) and one of
their mean (`"seed": "mean"`, with `<metric>_std` beside each metric, the sample standard deviation
over seeds, and the extremes `<metric>_min`, `<metric>_max`). `result.json` (written by
`experiments/train.py`) has the same: `per_seed` and the mean / std in `train`, `eval` and
`baseline`. A seed whose loss turns non-finite is reported (`per_seed[i]["stopped"]`) while the
others go on; `train.stop_accuracy` > 0 ends the run at the first evaluation where every seed's
eval accuracy reaches it (early stopping). Multi-seed runs keep no checkpoints: a run restarts from
step 0.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from linear_jax.training import data, evaluation, loop, metrics, optim, sharding, step
from linear_jax.training.mesh import mesh_from_config


def aggregate(values: list[dict]) -> dict:
    """Mean over seeds of every numeric metric, `<metric>_std` (ddof 1; 0 for one seed) and the
    extremes `<metric>_min`, `<metric>_max` (papers that report the best of their seeds, as
    Grazzi et al. 2025 do, compare with the max of an accuracy)."""
    out = {}
    for k in values[0]:
        xs = np.array([v[k] for v in values if isinstance(v.get(k), (int, float))], np.float64)
        if len(xs):
            out[k] = float(np.mean(xs))
            out[f"{k}_std"] = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
            out[f"{k}_min"], out[f"{k}_max"] = float(np.min(xs)), float(np.max(xs))
    return out


def _states(model_config, tx, seeds):
    """(graphdef, the seeds' train states stacked on a leading axis). Each seed is built
    eagerly, as `loop.train` builds it under jit (the same draws); a vmapped jit of the
    initialisation would cost more compilation than the train step."""
    from linear_jax.models import LM

    states = []
    for seed in seeds:
        graphdef, state = step.init_fn(lambda s=seed: LM(model_config, rngs=nnx.Rngs(s)), tx)()
        states.append(state)
    return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def train_seeds(config, seeds, *, devices=None) -> dict:
    """Trains `config` once per seed in `seeds`, vmapped, in `config.workdir`; returns the
    result (per seed and mean / std)."""
    tr, seeds = config.train, [int(s) for s in seeds]
    device = (devices or jax.devices())[0]
    mesh = mesh_from_config(config.mesh, [device])
    sources = [data.make_source(config.task, split="train", batch_size=tr.batch_size, seed=s)
               for s in seeds]
    evals = [evaluation.eval_sources(config, s) for s in seeds]
    model_config = loop.lm_config(config.model, sources[0].vocab_size)
    tx = optim.make_optimizer(tr)
    with loop.mesh_context(mesh, sharding.check_rules(config.sharding.rules)):
        graphdef, states = _states(model_config, tx, seeds)
        num_params = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(states["params"]))
        logging.info("%d seeds %s, %s parameters each, vmapped on %s", len(seeds), seeds,
                     f"{num_params:,}", device)
        train_step = jax.jit(jax.vmap(step.make_train_step(
            graphdef, tx, microbatches=tr.microbatches, aux_weight=tr.aux_loss_weight,
            lr_schedule=optim.schedule(tr))), donate_argnums=0)
        eval_step = jax.jit(jax.vmap(step.make_eval_step(graphdef)))
        result = _run(config, seeds, states, sources, evals, train_step, eval_step, device)
    result["params"] = num_params
    for i, seed in enumerate(seeds):
        ref = evaluation.baseline(config, seed)
        if ref is not None:
            result["per_seed"][i]["baseline"] = ref
    if "baseline" in result["per_seed"][0]:
        result["baseline"] = {k: aggregate([r["baseline"][k] for r in result["per_seed"]])
                              for k in result["per_seed"][0]["baseline"]}
    return result


def _stacked(sources, index: int, device):
    batches = [src.batch(index) for src in sources]
    return jax.device_put({k: np.stack([b[k] for b in batches]) for k in batches[0]}, device)


def _evaluate(eval_step, states, sources, num_batches: int, device) -> list[dict]:
    num_batches = evaluation.num_batches(sources[0], num_batches)
    totals = None
    for i in range(num_batches):
        sums = jax.device_get(eval_step(states, _stacked(sources, i, device)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return [evaluation.summarize({k: float(v[j]) for k, v in totals.items()}, src)
            for j, src in enumerate(sources)]


def _run(config, seeds, states, sources, evals, train_step, eval_step, device) -> dict:
    tr, ev = config.train, config.eval
    writer = metrics.JsonlWriter(pathlib.Path(config.workdir) / "metrics.jsonl")
    progress = metrics.Progress(0, tr.steps, enabled=tr.progress)
    per_seed = [{"seed": s, "train": {}, "eval": {}, "stopped": None} for s in seeds]
    result = {"seeds": seeds, "step": 0, "train": {}, "eval": {}, "stopped": None,
              "per_seed": per_seed}

    def write(s, split, values: list[dict]) -> dict:
        for seed, v in zip(seeds, values, strict=True):
            writer.write(s, split, {"seed": seed, **v})
        mean = aggregate(values)
        writer.write(s, split, {"seed": "mean", **mean})
        return mean

    def record(s, m) -> None:
        values = [{k: float(v[i]) for k, v in m.items()} for i in range(len(seeds))]
        for r, v in zip(per_seed, values, strict=True):
            r["train"] = v
            if r["stopped"] is None and not (np.isfinite(v["loss"]) and
                                             np.isfinite(v["grad_norm"])):
                r["stopped"] = f"nan at step {s}"
                logging.error("seed %d: non-finite loss at step %d", r["seed"], s)
        mean = aggregate(values)
        progress.update(s, mean)
        result["step"], result["train"] = s, mean
        if s % tr.log_every == 0 or s == tr.steps or s == 1:
            write(s, "train", values)
            if not tr.progress:
                logging.info("%s", metrics.log_line(s, tr.steps, mean))

    pending, t_start = None, time.perf_counter()
    try:
        for s in range(tr.steps):
            states, m = train_step(states, _stacked(sources, s, device))
            if pending is not None:             # the previous step's metrics, read one step late
                record(*jax.device_get(pending))
            pending = (s + 1, m)
            if (s + 1) % ev.every and s + 1 != tr.steps:
                continue
            record(*jax.device_get(pending))
            pending = None
            for name in evals[0]:
                values = _evaluate(eval_step, states, [e[name] for e in evals], ev.batches,
                                   device)
                for r, v in zip(per_seed, values, strict=True):
                    r["eval"][name] = v
                result["eval"][name] = write(s + 1, name, values)
            logging.info("step %d (mean of %d seeds): %s", s + 1, len(seeds),
                         evaluation.describe(result["eval"]))
            if all(r["stopped"] for r in per_seed):
                result["stopped"] = "nan"
                break
            target = tr.get("stop_accuracy", 0.0)
            if target and all(r["eval"]["eval"].get("accuracy", 0.0) >= target
                              for r in per_seed):
                result["stopped"] = f"every seed at eval accuracy >= {target}"
                break
    finally:
        progress.close()
    result["seconds"] = time.perf_counter() - t_start
    return result
