"""Multi-seed training (linear_jax/training/seeds.py): two seeds vmapped in one run give each
seed's single run, step by step; the records and the mean / std are where the docs say."""

import jax
import numpy as np

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
