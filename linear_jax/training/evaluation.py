"""Evaluation: eval sources, summed eval batches -> metrics, and a task's reference baseline."""

from __future__ import annotations

import jax

from linear_jax.training import data
from linear_jax.training.mesh import ConfigError


def eval_sources(config, seed: int) -> dict:
    """`{"eval": source, "eval_len<T>": source, ..., "eval_len<lo>-<hi>": source}`: the task at
    its length, at each of `eval.seq_lens`, and, with `eval.length_range = (lo, hi)`, at a
    length per row drawn from [lo, hi] (a test set that mixes its lengths, as the papers' do)."""
    ev = config.eval
    lengths = [None] + [n for n in ev.get("seq_lens", ()) if n != config.task.seq_len]
    out = {("eval" if n is None else f"eval_len{n}"): data.make_source(
        config.task, split="eval", batch_size=ev.batch_size, seed=seed, seq_len=n)
        for n in lengths}
    span = ev.get("length_range", ())
    if span:
        if len(span) != 2 or not 1 <= span[0] <= span[1]:
            raise ConfigError(f"eval.length_range must be (low, high) with 1 <= low <= high, "
                              f"got {tuple(span)}")
        lo, hi = span
        out[f"eval_len{lo}-{hi}"] = data.make_source(
            config.task, split="eval", batch_size=ev.batch_size, seed=seed, seq_len=hi,
            min_seq_len=lo)
    return out


def num_batches(source, n: int) -> int:
    """`n`, or fewer where the held-out text has fewer rows (eval batches do not wrap around)."""
    if isinstance(source, data.TextSource):
        return max(1, min(n, source.num_rows // source.batch_size))
    return n


def evaluate(eval_step, state, source, n: int, batch_sharding) -> dict[str, float]:
    totals = {}
    for i in range(num_batches(source, n)):
        sums = jax.device_get(eval_step(state, data.to_device(source.batch(i), batch_sharding)))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    return summarize(totals, source)


def summarize(totals, source) -> dict[str, float]:
    """Summed loss / correct / weight -> loss, accuracy and, for a task with C classes, the scaled
    accuracy (acc - 1/C) / (1 - 1/C): 0 at chance, 1 when solved (Grazzi et al. 2025's measure).
    A regression task reports its loss (mean squared error) alone."""
    w = max(totals["weight"], 1.0)
    out = {"loss": totals["loss"] / w}
    if source.regression:
        return out
    out["accuracy"] = totals["correct"] / w
    if source.num_classes:
        chance = 1.0 / source.num_classes
        out["scaled_accuracy"] = (out["accuracy"] - chance) / (1.0 - chance)
    return out


def describe(evals: dict[str, dict]) -> str:
    """`eval loss 0.1234 acc 0.9876; eval_len64 ...`: one log line for a set of evaluations."""
    return "; ".join(f"{k} loss {v['loss']:.4f}" + (f" acc {v['accuracy']:.4f}"
                                                     if "accuracy" in v else "")
                     for k, v in evals.items())


def baseline(config, seed: int):
    """The task's own reference predictors scored on the evaluation tasks of `eval` (the same
    batches the model is evaluated on), or None. For linear regression: `gd` and `gdpp`, as many
    steps of gradient descent / of GD++ as the model has layers, fitted on held-out tasks
    (`regression.baselines`), and `zero`, predicting y = 0 (the loss before any learning)."""
    from linear_jax.training import regression

    if config.task.name != "linear_regression":
        return None
    ev = config.eval
    batches = lambda split: [data.make_source(config.task, split=split, batch_size=ev.batch_size,
                                              seed=seed).batch(i) for i in range(ev.batches)]
    return regression.baselines(batches("tune"), batches("eval"), config.model.num_layers)
