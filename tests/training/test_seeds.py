"""Multi-seed training (linear_jax/training/seeds.py): two seeds vmapped in one run give each
seed's single run, step by step; the records and the mean / std are where the docs say."""

import jax
import numpy as np
import pytest

from linear_jax.training import loop, seeds
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
