"""The training loop: config -> mesh, data, model, sharded state -> steps, evals, checkpoints.

    eval_shape(model) -> shardings from the rules -> jit(init, out_shardings) (or restore)
    for each step: batch -> jit(train_step, donated state) -> metrics of the previous step -> log
                   every `eval.every`: eval sets; every `train.checkpoint_every`: async save

`config.init_from` (optional): a transformers checkpoint directory (`linear_jax.hub`) whose
weights start a fresh run instead of the random initialisation (fine-tuning).

`train(config)` is the whole run and returns the final metrics; it is what `experiments/train.py`
calls and what a notebook calls. A configuration that cannot run raises `ConfigError` before any
compilation; a non-finite loss or gradient stops the run (`result["stopped"] == "nan"`).

Sequence parallelism: a mesh with `mesh.seq > 1` splits every sequence over the `seq` axis
(`linear_jax.parallel.SeqParallel`, handed to the train and eval steps). The optional config
section `seq_parallel` may set its `attention_layout` ("contiguous" | "zigzag") and `mode`
("saved" | "rerun" | "autodiff"); without it the defaults apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from linear_jax.training import checkpoint, data, metrics, optim, sharding, step
from linear_jax.training.evaluation import baseline, describe, eval_sources, evaluate
from linear_jax.training.mesh import ConfigError, mesh_from_config


def lm_config(model_config, vocab_size: int):
    """The `LMConfig` described by `model_config` (LMConfig fields; vocab_size from the task
    unless set; init_std 0 stands for d_model^-1/2, so that it follows the width)."""
    from linear_jax.models import LMConfig

    kwargs = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if kwargs.get("vocab_size") is not None and kwargs["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size={kwargs['vocab_size']} < the task's {vocab_size}")
    kwargs["vocab_size"] = kwargs.get("vocab_size") or vocab_size
    if kwargs.get("init_std") == 0 and isinstance(kwargs.get("d_model"), int):
        kwargs["init_std"] = kwargs["d_model"] ** -0.5
    try:
        return LMConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def build_model(model_config, vocab_size: int, seed: int):
    """A zero-argument constructor of the LM described by `model_config` (LMConfig fields)."""
    from linear_jax.models import LM

    cfg = lm_config(model_config, vocab_size)
    return lambda: LM(cfg, rngs=nnx.Rngs(seed))


def seq_parallel_of(config, mesh, model_config):
    """The `SeqParallel` of a mesh with `seq > 1` (None otherwise), from the optional config
    section `seq_parallel`; a ConfigError when a layer of the model has no parallel form."""
    if mesh.shape["seq"] == 1:
        return None
    from linear_jax.layers import supports_seq_parallel
    from linear_jax.parallel import SeqParallel

    cannot = sorted({m for m in model_config.layer_mixers() if not supports_seq_parallel(m)})
    if cannot:
        raise ConfigError(f"mesh.seq={mesh.shape['seq']}: mixer(s) {cannot} have no "
                          f"sequence-parallel form; use mesh.seq=1")
    options = config.get("seq_parallel") or {}
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    try:
        sp = SeqParallel(mesh, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"seq_parallel: {e}") from None
    if sp.attention_layout == "zigzag" and config.task.seq_len % (2 * sp.size):
        raise ConfigError(f"seq_parallel.attention_layout='zigzag' needs task.seq_len="
                          f"{config.task.seq_len} to be a multiple of 2 x seq = {2 * sp.size}")
    logging.info("sequence parallel: T split over %d shards of mesh axis 'seq' (attention "
                 "layout %s, backward %s)", sp.size, sp.attention_layout, sp.mode)
    return sp


def mesh_context(mesh, rules):
    """The mesh and the logical rules, for code that shards activations or runs shard_map."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nnx.logical_axis_rules(tuple((k, v or None) for k, v in rules.items())))
    return stack


def _check(config, mesh) -> None:
    tr = config.train
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if tr.steps <= 0 or tr.batch_size <= 0 or tr.microbatches <= 0:
        raise ConfigError("train.steps, train.batch_size and train.microbatches must be positive")
    if tr.batch_size % (tr.microbatches * rows):
        raise ConfigError(f"train.batch_size={tr.batch_size} must be a multiple of "
                          f"train.microbatches x data x fsdp = {tr.microbatches} x {rows}")
    if config.eval.batch_size % rows:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be a multiple of "
                          f"data x fsdp = {rows}")
    for name, n in [("task.seq_len", config.task.seq_len)] + [
            ("eval.seq_lens", n) for n in config.eval.get("seq_lens", ())] + [
            ("eval.length_range", n) for n in config.eval.get("length_range", ())[1:]]:
        if n % mesh.shape["seq"]:
            raise ConfigError(f"{name}: {n} must be a multiple of seq = {mesh.shape['seq']}")


def train(config, *, devices=None) -> dict:
    """Runs (or resumes) the run in `config.workdir`; returns the last train and eval metrics."""
    tr, workdir = config.train, pathlib.Path(config.workdir)
    mesh = mesh_from_config(config.mesh, devices)
    rules = sharding.check_rules(config.sharding.rules)
    _check(config, mesh)
    source = data.make_source(config.task, split="train", batch_size=tr.batch_size,
                              seed=config.seed)
    evals = eval_sources(config, config.seed)
    model_config = lm_config(config.model, source.vocab_size)
    seq_parallel = seq_parallel_of(config, mesh, model_config)
    make_model = build_model(config.model, source.vocab_size, config.seed)
    tx = optim.make_optimizer(tr)
    batch_sh = sharding.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    with mesh_context(mesh, rules):
        init = step.init_fn(make_model, tx)
        graphdef, abstract_state = _abstract(init)
        shardings = sharding.tree_shardings(abstract_state, mesh, rules)
        num_params = _count(abstract_state["params"])
        logging.info("parameters: %s (%s)", f"{num_params:,}",
                     sharding.describe(shardings["params"]))
        ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=tr.checkpoint_every,
                                       keep=tr.keep_checkpoints)
        try:
            restored = ckpt.restore(checkpoint.abstract(abstract_state, shardings))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{workdir / 'checkpoints'} holds a checkpoint that does not fit "
                              f"this model and optimiser (use another workdir): "
                              f"{str(e).splitlines()[0][:300]}") from None
        if restored is None:
            state = jax.jit(lambda: init()[1], out_shardings=shardings)()
            if config.get("init_from"):
                state["params"] = pretrained(config, model_config, mesh, rules,
                                             shardings["params"])
            position, start = 0, 0
        else:
            state, position, start = restored
        train_step = jax.jit(
            step.make_train_step(graphdef, tx, microbatches=tr.microbatches,
                                 aux_weight=tr.aux_loss_weight, lr_schedule=optim.schedule(tr),
                                 seq_parallel=seq_parallel),
            in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
            donate_argnums=0)
        train_step, timing = _compile(train_step, state, source.batch(0), batch_sh)
        eval_step = jax.jit(step.make_eval_step(graphdef, seq_parallel),
                            in_shardings=(shardings, batch_sh), out_shardings=replicated)
        speed = _throughput(config, nnx.merge(graphdef, abstract_state["params"],
                                              abstract_state["rest"]), mesh)
        result = _run(config, state, position, start, source, evals, train_step, eval_step,
                      ckpt, batch_sh, workdir, speed, resumed=restored is not None)
    ref = baseline(config, config.seed)
    if ref is not None:
        result["baseline"] = ref
    return {**result, "params": num_params, "compile": timing}


def _compile(train_step, state, batch, batch_sh):
    """The train step lowered and compiled ahead of the first step (timed and logged, so the
    compile time is not counted as a step); returns (the compiled step, its timings)."""
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
                for k, v in batch.items()}
    t0 = time.perf_counter()
    lowered = train_step.lower(state, abstract)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    timing = {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}
    logging.info("train step: lowered in %.1f s, compiled in %.1f s", timing["lower_s"],
                 timing["compile_s"])
    return compiled, timing


def _throughput(config, model, mesh) -> metrics.Throughput:
    """Tokens per step, training FLOPs per token of `model` (abstract; `linear_jax.models.flops`)
    and the mesh's peak (`train.peak_flops` per device if set, else the table's figure)."""
    from linear_jax.models.flops import flops_per_token, peak_flops

    tr = config.train
    flops = flops_per_token(model, config.task.seq_len)["total"]
    peak, source = (tr.peak_flops, "train.peak_flops") if tr.get("peak_flops") else \
        peak_flops(mesh.devices.flat[0])
    if peak is None:
        logging.info("MFU: not reported (%s; set train.peak_flops)", source)
    else:
        logging.info("MFU: %.3g training FLOPs per token against %d x %.4g FLOP/s (%s)", flops,
                     mesh.devices.size, peak, source)
    return metrics.Throughput(tr.batch_size * config.task.seq_len, flops,
                              None if peak is None else peak * mesh.devices.size)


def pretrained(config, model_config, mesh, rules, shardings):
    """The parameters of the transformers checkpoint in directory `config.init_from`
    (`linear_jax.hub`), placed as `shardings`; its model must be `model_config` exactly (a
    fine-tuning config takes its `model` section from `hub.read_config`)."""
    from linear_jax import hub

    overrides = {k: getattr(model_config, k) for k in hub.OVERRIDES}
    try:
        stored = hub.read_config(config.init_from, **overrides)
    except ValueError as e:
        raise ConfigError(f"init_from: {e}") from None
    # remat changes how the backward is computed, not the model: no checkpoint records it
    stored = dataclasses.replace(stored, remat=model_config.remat)
    if stored != model_config:
        raise ConfigError(f"init_from={config.init_from}: its model {stored} is not the config's "
                          f"{model_config}")
    model = hub.load(config.init_from, mesh=mesh, rules=tuple(rules.items()), **overrides)
    logging.info("parameters from %s", config.init_from)
    return jax.device_put(nnx.state(model, nnx.Param), shardings)


def load_model(config, *, devices=None):
    """The model of the run in `config.workdir` at its latest checkpoint, as an nnx module (for
    evaluations beyond the training loop's); raises FileNotFoundError when there is none."""
    mesh = mesh_from_config(config.mesh, devices)
    rules = sharding.check_rules(config.sharding.rules)
    vocab = data.make_source(config.task, split="train", batch_size=1, seed=config.seed).vocab_size
    make_model = build_model(config.model, vocab, config.seed)
    with mesh_context(mesh, rules):
        graphdef, abstract_state = _abstract(step.init_fn(make_model,
                                                          optim.make_optimizer(config.train)))
        shardings = sharding.tree_shardings(abstract_state, mesh, rules)
        ckpt = checkpoint.Checkpointer(pathlib.Path(config.workdir) / "checkpoints", every=1)
        restored = ckpt.restore(checkpoint.abstract(abstract_state, shardings))
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {config.workdir}/checkpoints")
    state = restored[0]
    return nnx.merge(graphdef, state["params"], state["rest"])


def _abstract(init):
    out = {}

    def shapes_only():
        out["graphdef"], state = init()
        return state

    abstract_state = jax.eval_shape(shapes_only)
    return out["graphdef"], abstract_state


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _run(config, state, position, start, source, evals, train_step, eval_step, ckpt, batch_sh,
         workdir, speed, *, resumed):
    tr, ev = config.train, config.eval
    writer = metrics.JsonlWriter(workdir / "metrics.jsonl", resume_step=start if resumed else None,
                                 tensorboard=workdir / "tensorboard" if tr.get("tensorboard")
                                 else None)
    progress = metrics.Progress(start, tr.steps, enabled=tr.progress)
    lagged = metrics.Lagged()
    result = {"step": start, "train": {}, "eval": {}, "stopped": None}
    t_start = time.perf_counter()

    def record(done) -> bool:
        s, m = done
        logged = s % tr.log_every == 0 or s == tr.steps or s == start + 1
        if logged:          # rates averaged over the steps since the last logged one
            m.update(speed.report())
        progress.update(s, m)
        result["step"], result["train"] = s, m
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            logging.error("non-finite loss %s / grad norm %s at step %d: stopping",
                          m["loss"], m["grad_norm"], s)
            writer.write(s, "train", m)
            result["stopped"] = "nan"
            return False
        if logged:
            writer.write(s, "train", m)
            if not tr.progress:
                logging.info("%s", metrics.log_line(s, tr.steps, m))
        return True

    try:
        for s in range(start, tr.steps):
            t0 = time.perf_counter()
            batch = data.to_device(source.batch(position), batch_sh)
            state, m = train_step(state, batch)
            position += 1
            eval_due = (s + 1) % ev.every == 0 or s + 1 == tr.steps
            # Before an eval (which blocks anyway) this step's metrics are fetched too.
            ready = [lagged.push(s + 1, m)] + ([lagged.flush()] if eval_due else [])
            ready = [d for d in ready if d is not None]
            speed.add(time.perf_counter() - t0)
            if not all(record(d) for d in ready):
                break
            if eval_due:
                for name, src in evals.items():
                    result["eval"][name] = evaluate(eval_step, state, src, ev.batches, batch_sh)
                    writer.write(s + 1, name, result["eval"][name])
                logging.info("step %d: %s", s + 1, describe(result["eval"]))
            ckpt.save(s + 1, state, position, force=s + 1 == tr.steps)
    finally:
        progress.close()
        ckpt.close()
    result["seconds"] = time.perf_counter() - t_start
    result["throughput"] = {**speed.overall(), "flops_per_token": speed.flops_per_token,
                            "peak_flops": speed.peak}
    return result
