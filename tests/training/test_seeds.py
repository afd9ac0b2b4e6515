"""Multi-seed training (linear_jax/training/seeds.py): two seeds vmapped in one run give each
seed's single run, step by step; the records and the mean / std are where the docs say."""

import json
import time

import jax
import numpy as np
import pytest

from linear_jax.training import ConfigError, loop, seeds
from linear_jax.training.metrics import read_jsonl
from tests.training.test_train import tiny

STEPS = {"model__mixer": "linear_attention", "model__mixer_options": {}, "model__ffn": "none",
         "model__impl": "recurrent", "model__d_model": 16, "task__seq_len": 16,
         "train__steps": 3, "train__checkpoint_every": 0, "train__batch_size": 4,
         "eval__every": 3, "eval__batch_size": 4}


def _per_seed(workdir, seed, split="train"):
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl", split)
            if r.get("seed", seed) == seed}


def test_two_seeds_vmapped_equal_two_single_runs(tmp_path):
    device = jax.devices()[:1]
    both = seeds.train_seeds(tiny(tmp_path / "both", **STEPS), [3, 5], devices=device)
    for i, seed in enumerate([3, 5]):
        one = loop.train(tiny(tmp_path / f"s{seed}", seed=seed, mesh__data=1, **STEPS),
                         devices=device)
        a, b = _per_seed(tmp_path / "both", seed), _per_seed(tmp_path / f"s{seed}", seed)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)
        got = both["per_seed"][i]["eval"]["eval"]
        np.testing.assert_allclose(got["loss"], one["eval"]["eval"]["loss"], rtol=1e-5)
        assert got["accuracy"] == one["eval"]["eval"]["accuracy"]
    # the seeds differ, and the mean record is their mean
    losses = [both["per_seed"][i]["eval"]["eval"]["loss"] for i in range(2)]
    assert losses[0] != losses[1]
    mean = both["eval"]["eval"]
    assert np.isclose(mean["loss"], np.mean(losses))
    assert np.isclose(mean["loss_std"], np.std(losses, ddof=1))
    last = [r for r in read_jsonl(tmp_path / "both" / "metrics.jsonl", "eval")
            if r["seed"] == "mean"][-1]
    assert np.isclose(last["loss"], mean["loss"]) and "scaled_accuracy_std" in last


def test_aggregate_means_numbers_and_skips_the_rest():
    out = seeds.aggregate([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "y"}])
    assert out == {"a": 2.0, "a_std": np.std([1.0, 3.0], ddof=1), "a_min": 1.0, "a_max": 3.0}
    assert seeds.aggregate([{"a": 1.0}]) == {"a": 1.0, "a_std": 0.0, "a_min": 1.0, "a_max": 1.0}


def test_learning_rate_sweep_vmapped_equals_its_runs_apart(tmp_path):
    """train_sweep: each lr's members are that lr's own multi-seed run (updates scaled by
    lr / reference lr, which AdamW's linearity in lr makes exact to rounding), each with its
    own metrics.jsonl; configs that differ beyond train.lr are refused."""
    device = jax.devices()[:1]
    run = {**STEPS, "train__warmup_steps": 1, "train__weight_decay": 0.1}
    lrs = (1e-2, 3e-3)
    sweep = seeds.train_sweep([tiny(tmp_path / f"sweep{lr}", train__lr=lr, **run)
                               for lr in lrs], [3, 5], devices=device)
    for lr, got in zip(lrs, sweep, strict=True):
        alone = seeds.train_seeds(tiny(tmp_path / f"alone{lr}", train__lr=lr, **run), [3, 5],
                                  devices=device)
        for seed in (3, 5):
            a, b = _per_seed(tmp_path / f"sweep{lr}", seed), _per_seed(tmp_path / f"alone{lr}",
                                                                         seed)
            assert sorted(a) == sorted(b) == [1, 2, 3]
            np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)
        np.testing.assert_allclose(got["eval"]["eval"]["loss"], alone["eval"]["eval"]["loss"],
                                   rtol=1e-5)
        np.testing.assert_allclose(got["train"]["lr"], alone["train"]["lr"], rtol=1e-6)
    assert sweep[0]["eval"]["eval"]["loss"] != sweep[1]["eval"]["eval"]["loss"]
    with pytest.raises(ValueError, match="differ only in train.lr"):
        seeds.train_sweep([tiny(tmp_path / "x", **run), tiny(tmp_path / "y",
                                                             **{**run, "train__steps": 2})],
                          [0], devices=device)


def _records(workdir):
    return [(r["step"], r["split"], r["seed"], r["loss"]) for r in
            read_jsonl(workdir / "metrics.jsonl")]


def test_a_cut_sweep_resumed_from_its_checkpoint_logs_what_one_uninterrupted_run_logs(tmp_path):
    """Two lrs x two seeds: a deadline already past cuts the run at its first evaluation (step
    2), which saves a checkpoint; the next call resumes there and ends at step 4 with the
    metrics, evaluations and result of a run never cut, and a finished run resumed trains no
    more. A checkpoint of another config is refused, or removed with `fresh_if_stale`."""
    device = jax.devices()[:1]
    run = {**STEPS, "train__steps": 4, "eval__every": 2, "train__checkpoint_every": 2,
           "train__log_every": 1, "train__warmup_steps": 1}
    lrs = (1e-2, 3e-3)

    def sweep(name, **kw):
        return seeds.train_sweep([tiny(tmp_path / f"{name}{lr}", train__lr=lr, **run)
                                  for lr in lrs], [3, 5], devices=device, **kw)

    whole = sweep("whole")
    cut = sweep("cut", deadline=time.monotonic())
    assert [r["step"] for r in cut] == [2, 2] and all(r["partial"] for r in cut)
    assert (tmp_path / f"cut{lrs[0]}" / "checkpoints").is_dir()
    # a mark in a record before the cut: a resumed run keeps those records, one started over
    # would write them again
    log = tmp_path / f"cut{lrs[0]}" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "loss": 123.0})
    log.write_text("\n".join(lines) + "\n")
    resumed = sweep("cut")
    assert _records(tmp_path / f"cut{lrs[0]}")[0][3] == 123.0
    for lr, a, b in zip(lrs, whole, resumed, strict=True):
        assert b["step"] == 4 and not b.get("partial")
        got, want = _records(tmp_path / f"cut{lr}"), _records(tmp_path / f"whole{lr}")
        assert [r[:3] for r in got] == [r[:3] for r in want]
        assert [r[3] for r in got if r[0] > 2] == pytest.approx(
            [r[3] for r in want if r[0] > 2], rel=1e-6)
        for x, y in zip(a["per_seed"], b["per_seed"], strict=True):
            assert x["eval"]["eval"]["loss"] == pytest.approx(y["eval"]["eval"]["loss"], rel=1e-6)
        assert b["eval"]["eval"]["loss"] == pytest.approx(a["eval"]["eval"]["loss"], rel=1e-6)
    assert sweep("cut")[0]["eval"] == resumed[0]["eval"]        # ended: nothing more to train
    assert len(_records(tmp_path / f"cut{lrs[0]}")) == len(_records(tmp_path / f"whole{lrs[0]}"))
    other = {**run, "train__steps": 6}
    with pytest.raises(ConfigError, match="another config"):
        seeds.train_sweep([tiny(tmp_path / f"cut{lr}", train__lr=lr, **other) for lr in lrs],
                          [3, 5], devices=device)
    fresh = seeds.train_sweep([tiny(tmp_path / f"cut{lr}", train__lr=lr, **other)
                               for lr in lrs], [3, 5], devices=device, fresh_if_stale=True)
    assert fresh[0]["step"] == 6
    assert [r[0] for r in _records(tmp_path / f"cut{lrs[0]}") if r[1] == "train"][:2] == [1, 1]


def test_the_deadline_clock_trains_on_until_one_more_step_and_an_evaluation_would_not_fit():
    """A slow cell (5 s a step, its first step with the compile 60 s, no evaluation yet: one is
    guessed at 120 s) whose next evaluation is 497 steps away trains on while a step and an
    evaluation still fit before the deadline, and evaluates once they would not."""
    clock = seeds._Clock(0.0)
    clock.stepped(1, 60.0)
    assert not clock.must_evaluate(61.0, 497, deadline=0.0)     # no step time known yet
    clock.stepped(2, 65.0)
    assert clock.step_s == 5.0
    assert not clock.must_evaluate(65.0, 497, deadline=65.0 + 1000)
    assert clock.must_evaluate(65.0, 497, deadline=65.0 + 124)
    assert not clock.must_evaluate(65.0, 10, deadline=65.0 + 171)    # the evaluation fits
    clock.evaluated(30.0)                                      # measured: 30 s, not 120
    assert not clock.must_evaluate(65.0, 497, deadline=65.0 + 36)
