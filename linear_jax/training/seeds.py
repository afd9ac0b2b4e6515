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
eval accuracy reaches it (early stopping).

With `train.checkpoint_every` > 0 the stacked states are saved in `<workdir of the first
config>/checkpoints` (orbax, asynchronously) at the first evaluation at or past each multiple of
it, at a deadline's cut and where the run ends, with what the records need to go on (each seed's
last evaluation, the mean of the last train step, the seconds so far). A run that finds a
checkpoint there resumes from it: the same batches (a step's batch is a function of its index),
the same states, `metrics.jsonl` cut back to the checkpoint's step, so a run cut or killed and
resumed logs what one uninterrupted run logs (`tests/training/test_seeds.py`). A checkpoint of
another config (the configs but for `workdir`, `model.impl` and how checkpoints are kept, the
seeds) is refused with a `ConfigError`, or, with `fresh_if_stale`, removed and the run started
over.

`train_sweep(configs, seeds)` trains a learning-rate sweep the same way: configs that differ only
in `train.lr` (and `workdir`), every (lr, seed) pair one member of the vmapped step. AdamW's update
(weight decay included) is linear in the learning rate, so each member's update is the reference
config's scaled by lr / reference lr (`state["lr_scale"]`, `step.make_train_step`); each config
gets its own `metrics.jsonl` and result. With early stopping the sweep ends when every seed of
one lr reaches the target (that lr's result says so; the others say they were cut with it).

`deadline` (a `time.monotonic()` value) ends a run early at the last evaluation that the next
interval of evaluations would carry past it: the result is then marked `"partial": True`, its
`stopped` says at which step, and its values are those of that evaluation (a wall-clock budget,
as on a lent GPU, leaves a measured point instead of nothing). Where no scheduled evaluation can
be reached in time (a slow cell's first interval), the run evaluates at the last step before the
deadline instead, at the step time measured so far and an evaluation as long as the last one
(before the first: twice the first step, which holds the compile).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import pathlib
import shutil
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from linear_jax.training import checkpoint, data, evaluation, loop, metrics, optim, sharding, step
from linear_jax.training.mesh import ConfigError, mesh_from_config


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


def train_seeds(config, seeds, *, devices=None, deadline=None, fresh_if_stale=False) -> dict:
    """Trains `config` once per seed in `seeds`, vmapped, in `config.workdir`; returns the
    result (per seed and mean / std)."""
    return train_sweep([config], seeds, devices=devices, deadline=deadline,
                       fresh_if_stale=fresh_if_stale)[0]


def _check_sweep(configs) -> None:
    def rest(c):
        d = c.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k != "lr"}
        d.pop("workdir", None)
        return d

    for c in configs[1:]:
        if rest(c) != rest(configs[0]):
            raise ValueError("train_sweep: the configs may differ only in train.lr and workdir")
    if any(c.train.lr <= 0 for c in configs):
        raise ValueError(f"train_sweep: every train.lr must be > 0, got "
                         f"{[c.train.lr for c in configs]}")


def train_sweep(configs, seeds, *, devices=None, deadline=None,
                fresh_if_stale=False) -> list[dict]:
    """Trains every config of a learning-rate sweep (module docstring) once per seed, all
    vmapped together; returns one result per config, as `train_seeds` would."""
    with _sweep(configs, seeds, devices, resume="fresh" if fresh_if_stale else "strict") as sw:
        logging.info("%d seeds %s x %d learning rates, %s parameters each, vmapped on %s",
                     len(sw.seeds), sw.seeds, len(configs), f"{sw.num_params:,}", sw.device)
        results = _run(configs, sw, deadline)
    # a baseline (e.g. tuned GD on the eval tasks) depends on the task and seed, not on the lr
    refs = [evaluation.baseline(configs[0], seed) for seed in sw.seeds]
    for result in results:
        result["params"] = sw.num_params
        attach_baselines(result, refs)
    return results


def attach_baselines(result: dict, refs: list) -> dict:
    """Puts each seed's baseline (`evaluation.baseline`, in `result["seeds"]`' order) into its
    `per_seed` entry and their mean / std into `result["baseline"]`; none where refs are None."""
    if refs and refs[0] is not None:
        for r, ref in zip(result["per_seed"], refs, strict=True):
            r["baseline"] = ref
        result["baseline"] = {k: aggregate([ref[k] for ref in refs]) for k in refs[0]}
    return result


def step_cost(configs, seeds, *, devices=None, time_steps: int = 0, trace=None) -> dict:
    """XLA's cost analysis of the sweep's compiled train step on this backend: {"flops",
    "bytes_accessed", "members", "params"} per step (bytes as XLA counts them for its fusions:
    a bound to plan device time by, not a measurement; a Pallas kernel's custom call counts
    nothing). With `time_steps` > 0 also "ms_per_step", measured: the median over three rounds
    of `time_steps` steps run back to back on one batch, after one warm-up step (a Pallas
    kernel's time is in it, the batches' drawing is not). `trace(step, batch)`, if given, is
    called with a one-argument step (it carries the state from call to call) and its result
    kept as "trace": e.g. a profiler's per-kernel times of a few steps."""
    with _sweep(configs, seeds, devices) as sw:
        batch = _stacked(sw.sources, 0, sw.device, len(configs))
        t0 = time.perf_counter()
        compiled = sw.train_step.lower(sw.states, batch).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        out = {"members": len(configs) * len(sw.seeds), "params": sw.num_params,
               "compile_s": compile_s}
        if time_steps > 0 or trace is not None:
            states, m = compiled(sw.states, batch)          # donates sw.states
            jax.block_until_ready(m)
        if time_steps > 0:
            rounds = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(time_steps):
                    states, m = compiled(states, batch)
                jax.block_until_ready((states, m))
                rounds.append(1e3 * (time.perf_counter() - t0) / time_steps)
            out["ms_per_step"] = float(np.median(rounds))
        if trace is not None:
            box = [states]

            def one(batch):
                box[0], metrics_ = compiled(box[0], batch)
                return metrics_
            out["trace"] = trace(one, batch)
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)), **out}


def _identity(configs, seeds) -> dict:
    """What a checkpoint must have been saved by to be resumed: the configs but for where they
    write, which implementation computes the mixer and how checkpoints are kept, and the seeds."""
    out = []
    for c in configs:
        d = json.loads(c.to_json_best_effort())
        d.pop("workdir", None)
        d.get("model", {}).pop("impl", None)
        for key in ("checkpoint_every", "keep_checkpoints", "progress"):
            d.get("train", {}).pop(key, None)
        out.append(d)
    return {"configs": out, "seeds": list(seeds)}


def _resume(configs, seeds, states, mode: str):
    """(checkpointer, states, (step, meta) or None) for the sweep's checkpoints (module
    docstring); (None, states, None) when `train.checkpoint_every` is 0."""
    tr = configs[0].train
    if tr.checkpoint_every <= 0:
        return None, states, None
    directory = pathlib.Path(configs[0].workdir) / "checkpoints"
    ckpt = checkpoint.Checkpointer(directory, every=tr.checkpoint_every,
                                   keep=tr.keep_checkpoints)
    at = ckpt.latest_step()
    if at is None:
        return ckpt, states, None
    meta = ckpt.read_meta(at)
    if meta is None or meta.get("identity") != _identity(configs, seeds):
        if mode != "fresh":
            ckpt.close()
            raise ConfigError(f"{directory} holds a checkpoint of another config or other seeds "
                              f"(use another workdir, or remove it)")
        logging.warning("%s: a checkpoint of another config; starting over", directory)
        ckpt.close()
        shutil.rmtree(directory)
        return _resume(configs, seeds, states, mode)
    target = checkpoint.abstract(states, jax.tree.map(lambda x: x.sharding, states))
    restored, _, at = ckpt.restore(target)
    logging.info("resuming %d seeds x %d configs at step %d", len(seeds), len(configs), at)
    return ckpt, restored, (at, meta)


@contextlib.contextmanager
def _sweep(configs, seeds, devices, resume: str | None = None):
    """What a sweep trains with, under its mesh: the seeds' sources and eval sets, the stacked
    states (member g * S + i: config g, seed i) and the vmapped, jitted steps; with `resume`
    ("strict" or "fresh": what a stale checkpoint gets) the checkpointer and where to start."""
    _check_sweep(configs)
    config = configs[0]
    tr, seeds = config.train, [int(s) for s in seeds]
    device = (devices or jax.devices())[0]
    mesh = mesh_from_config(config.mesh, [device])
    sources = [data.make_source(config.task, split="train", batch_size=tr.batch_size, seed=s)
               for s in seeds]
    evals = [evaluation.eval_sources(config, s) for s in seeds]
    model_config = loop.lm_config(config.model, sources[0].vocab_size)
    tx = optim.make_optimizer(tr)
    G = len(configs)
    with loop.mesh_context(mesh, sharding.check_rules(config.sharding.rules)):
        graphdef, states = _states(model_config, tx, seeds)
        num_params = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(states["params"]))
        if G > 1:             # the same draws for every lr
            states = jax.tree.map(lambda x: jnp.concatenate([x] * G), states)
            states["lr_scale"] = jnp.asarray([c.train.lr / tr.lr for c in configs
                                              for _ in seeds], jnp.float32)
        train_step = jax.jit(jax.vmap(step.make_train_step(
            graphdef, tx, microbatches=tr.microbatches, aux_weight=tr.aux_loss_weight,
            lr_schedule=optim.schedule(tr))), donate_argnums=0)
        eval_step = jax.jit(jax.vmap(step.make_eval_step(graphdef)))
        ckpt, start = None, None
        if resume is not None:
            ckpt, states, start = _resume(configs, seeds, states, resume)
        try:
            yield types.SimpleNamespace(seeds=seeds, device=device, sources=sources,
                                        evals=evals, states=states, num_params=num_params,
                                        train_step=train_step, eval_step=eval_step, ckpt=ckpt,
                                        start=start)
        finally:
            if ckpt is not None:
                ckpt.close()


def _stack(batches, device, copies: int):
    batches = list(batches) * copies
    return jax.device_put({k: np.stack([b[k] for b in batches]) for k in batches[0]}, device)


def _stacked(sources, index: int, device, copies: int = 1):
    return _stack([src.batch(index) for src in sources], device, copies)


class _Prefetched:
    """Step i's stacked training batch, with the next `ahead` steps' batches drawn meanwhile in
    threads, one per seed (numpy's generators and sorts release the GIL), while the device runs:
    at Zoology's MQAR sizes drawing the seeds' batches took longer than a small model's step."""

    def __init__(self, sources, device, copies: int, ahead: int = 2):
        self.sources, self.device, self.copies, self.ahead = sources, device, copies, ahead
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(sources))
        self.pending: dict[int, list] = {}

    def __call__(self, index: int):
        for i in range(index, index + self.ahead + 1):
            if i not in self.pending:
                self.pending[i] = [self.pool.submit(src.batch, i) for src in self.sources]
        return _stack([f.result() for f in self.pending.pop(index)], self.device, self.copies)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _evaluate(eval_step, states, sources, num_batches: int, device, copies: int) -> list[dict]:
    """One summary per member (`copies` x the seeds' sources)."""
    num_batches = evaluation.num_batches(sources[0], num_batches)
    totals = None
    for i in range(num_batches):
        sums = jax.device_get(eval_step(states, _stacked(sources, i, device, copies)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return [evaluation.summarize({k: float(v[j]) for k, v in totals.items()}, src)
            for j, src in enumerate(sources * copies)]


class _Group:
    """The records of one config of a sweep: its metrics.jsonl, per-seed values, result."""

    def __init__(self, config, seeds, start: int | None = None, restored: dict | None = None):
        self.config, self.seeds = config, seeds
        self.writer = metrics.JsonlWriter(pathlib.Path(config.workdir) / "metrics.jsonl",
                                          resume_step=start)
        self.per_seed = [{"seed": s, "train": {}, "eval": {}, "stopped": None} for s in seeds]
        self.result = {"seeds": seeds, "step": start or 0, "train": {}, "eval": {},
                       "stopped": None, "per_seed": self.per_seed}
        if restored is not None:             # resumed: the records as the checkpoint left them
            self.per_seed[:] = restored["per_seed"]
            self.result.update(train=restored["train"], eval=restored["eval"],
                               stopped=restored["stopped"])

    def saved(self) -> dict:
        """What a checkpoint keeps of the records; `stopped` only where the run ended (early
        stop, every seed non-finite), not where a deadline cut it."""
        stopped = None if self.result.get("partial") else self.result["stopped"]
        return {"per_seed": self.per_seed, "train": self.result["train"],
                "eval": self.result["eval"], "stopped": stopped}

    def write(self, s, split, values: list[dict]) -> dict:
        for seed, v in zip(self.seeds, values, strict=True):
            self.writer.write(s, split, {"seed": seed, **v})
        mean = aggregate(values)
        self.writer.write(s, split, {"seed": "mean", **mean})
        return mean

    def record(self, s, values: list[dict], progress) -> None:
        tr = self.config.train
        for r, v in zip(self.per_seed, values, strict=True):
            r["train"] = v
            if r["stopped"] is None and not (np.isfinite(v["loss"]) and
                                             np.isfinite(v["grad_norm"])):
                r["stopped"] = f"nan at step {s}"
                logging.error("seed %d: non-finite loss at step %d", r["seed"], s)
        mean = aggregate(values)
        if progress is not None:
            progress.update(s, mean)
        self.result["step"], self.result["train"] = s, mean
        if s % tr.log_every == 0 or s == tr.steps or s == 1:
            self.write(s, "train", values)
            if not tr.progress:
                logging.info("%s", metrics.log_line(s, tr.steps, mean))

    def solved(self, target: float) -> bool:
        return all(r["eval"]["eval"].get("accuracy", 0.0) >= target for r in self.per_seed)


class _Clock:
    """Wall time of the steps and evaluations so far, for the deadline's forced evaluation."""

    def __init__(self, start: float):
        self.start, self.first = start, None     # first: (time, step) once step 1 was read
        self.step_s, self.eval_s, self.evals_s = None, None, 0.0

    def stepped(self, s: int, now: float) -> None:
        """Step s's metrics were read at `now` (steps 1..s done)."""
        if self.first is None:
            self.first = (now, s)
        elif s > self.first[1]:
            self.step_s = (now - self.first[0] - self.evals_s) / (s - self.first[1])

    def evaluated(self, seconds: float) -> None:
        self.eval_s = seconds
        self.evals_s += seconds if self.first is not None else 0.0

    def must_evaluate(self, now: float, to_next: int, deadline: float) -> bool:
        """Whether to evaluate now: the scheduled evaluation `to_next` steps away ends past the
        deadline, and so would one more step and an evaluation."""
        if self.step_s is None:
            return False
        eval_s = self.eval_s if self.eval_s is not None else 2 * (self.first[0] - self.start)
        return (now + to_next * self.step_s + eval_s > deadline
                and now + self.step_s + eval_s > deadline)


def _run(configs, sw, deadline=None) -> list[dict]:
    tr, ev = configs[0].train, configs[0].eval
    seeds, states, sources, evals, device = sw.seeds, sw.states, sw.sources, sw.evals, sw.device
    start, meta = sw.start or (0, None)
    groups = [_Group(c, seeds, start if meta else None, meta["groups"][g] if meta else None)
              for g, c in enumerate(configs)]
    S, G = len(seeds), len(groups)
    progress = metrics.Progress(start, tr.steps, enabled=tr.progress)
    before = meta["seconds"] if meta else 0.0          # the seconds of the runs resumed
    end = start if groups[0].result["stopped"] else tr.steps     # a resumed run that had ended

    def of(g, values):                         # member g * S + i: config g, seed i
        return values[g * S:(g + 1) * S]

    def record(s, m) -> None:
        values = [{k: float(v[j]) for k, v in m.items()} for j in range(S * G)]
        for g, group in enumerate(groups):
            group.record(s, of(g, values), progress if g == 0 else None)

    saved_at = start

    def save(s: int, force: bool) -> None:
        nonlocal saved_at
        every = tr.checkpoint_every
        if sw.ckpt is None or not (force or s // every > saved_at // every):
            return
        sw.ckpt.save(s, states, s, force=True, meta={
            "identity": _identity(configs, seeds), "groups": [g.saved() for g in groups],
            "seconds": before + time.perf_counter() - t_start})
        saved_at = s

    pending, t_start = None, time.perf_counter()
    t_eval = time.monotonic()                    # the last evaluation's end
    clock = _Clock(time.monotonic())
    batches = _Prefetched(sources, device, G)
    try:
        for s in range(start, end):
            states, m = sw.train_step(states, batches(s))
            if pending is not None:             # the previous step's metrics, read one step late
                record(*jax.device_get(pending))
                clock.stepped(s, time.monotonic())
            pending = (s + 1, m)
            forced = False
            if (s + 1) % ev.every and s + 1 != tr.steps:
                next_eval = min((s + 1) // ev.every * ev.every + ev.every, tr.steps)
                forced = deadline is not None and clock.must_evaluate(
                    time.monotonic(), next_eval - s - 1, deadline)
                if not forced:
                    continue
            record(*jax.device_get(pending))
            pending = None
            t_eval_start = time.monotonic()
            for name in evals[0]:
                values = _evaluate(sw.eval_step, states, [e[name] for e in evals], ev.batches,
                                   device, G)
                for g, group in enumerate(groups):
                    for r, v in zip(group.per_seed, of(g, values), strict=True):
                        r["eval"][name] = v
                    group.result["eval"][name] = group.write(s + 1, name, of(g, values))
            for group in groups:
                logging.info("step %d (lr %g, mean of %d seeds): %s", s + 1,
                             group.config.train.lr, S, evaluation.describe(group.result["eval"]))
            if all(r["stopped"] for g in groups for r in g.per_seed):
                for g in groups:
                    g.result["stopped"] = "nan"
                save(s + 1, force=True)
                break
            target = tr.get("stop_accuracy", 0.0)
            done = [g for g in groups if target and g.solved(target)]
            if done:
                for g in groups:
                    g.result["stopped"] = (
                        f"every seed at eval accuracy >= {target}" if g in done else
                        f"cut at step {s + 1}: lr {done[0].config.train.lr:g} of its sweep "
                        f"had every seed at eval accuracy >= {target}")
                save(s + 1, force=True)
                break
            now = time.monotonic()
            clock.evaluated(now - t_eval_start)
            late = deadline is not None and s + 1 < tr.steps and 2 * now - t_eval > deadline
            if forced or late:
                for g in groups:
                    g.result.update(partial=True, stopped=f"deadline: cut at step {s + 1} of "
                                                          f"{tr.steps}")
                logging.warning("deadline: cut at step %d of %d", s + 1, tr.steps)
                save(s + 1, force=True)
                break
            save(s + 1, force=s + 1 == tr.steps)
            t_eval = now
    finally:
        batches.close()
        progress.close()
    seconds = before + time.perf_counter() - t_start
    for g in groups:
        g.result["seconds"] = seconds
    return [g.result for g in groups]
