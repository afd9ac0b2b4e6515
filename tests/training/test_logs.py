"""Training logs without a progress bar: a line every `log_every` steps with loss, learning rate,
tokens/s, step time and MFU; tokens/s from the loop's iteration times (never a near-zero interval
between two fetches); the run's result carries step time, MFU and the compile time."""

import json
import logging

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from flax import nnx

from linear_jax.models import LM, LMConfig
from linear_jax.models.flops import active_params, flops_per_token, peak_flops
from linear_jax.training import loop, metrics
from linear_jax.training.metrics import read_jsonl
from tests.training.test_train import tiny


def test_throughput_reports_windows_and_never_an_empty_one():
    speed = metrics.Throughput(tokens_per_step=1000, flops_per_token=6.0, peak_flops=12e3)
    speed.add(0.5)
    speed.add(1.5)
    first = speed.report()                         # 2 steps in 2 s
    assert first == {"step_time_s": 1.0, "tokens_per_s": 1000.0, "mfu": 0.5}
    assert speed.report() == first                 # two fetches in one iteration: no 0 s window
    speed.add(0.25)
    assert speed.report()["tokens_per_s"] == 4000.0
    assert speed.overall()["step_time_s"] == pytest.approx(2.25 / 3)
    assert "mfu" not in metrics.Throughput(1000).report() | metrics.Throughput(1000).overall()


def test_flops_per_token_and_peaks():
    cfg = LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mixer="attention")
    model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert active_params(model) == n               # tied: the embedding counts once, as head
    f = flops_per_token(model, 16)
    assert f["params"] == 6 * n
    assert f["mixing"] == pytest.approx(3 * 2 * 4 * 2 * 16 * 8.5)   # 3 x L x 4 H Dh (T+1)/2
    latent = LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                      layers=("gated_attention", "mla"))
    f = flops_per_token(nnx.eval_shape(lambda: LM(latent, rngs=nnx.Rngs(0))), 16)
    assert f["mixing"] == pytest.approx(3 * 2 * 2 * (2 * 16 + 16 + 8 + 16) * 8.5)
    moe = LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, ffn="moe",
                   num_experts=4, top_k=1)
    moe_model = nnx.eval_shape(lambda: LM(moe, rngs=nnx.Rngs(0)))
    n_moe = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(moe_model, nnx.Param)))
    assert active_params(moe_model) == n_moe - 3 * 3 * 32 * moe.ff_width
    assert peak_flops(type("D", (), {"device_kind": "NVIDIA H200"})())[0] == 989e12
    assert peak_flops(type("D", (), {"device_kind": "cpu"})())[0] is None


@pytest.fixture
def absl_info():
    """absl's verbosity is process-wide: another test in this worker may have lowered it."""
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    yield
    absl_logging.set_verbosity(before)


def test_flops_of_every_mixer():
    """The MFU estimate covers every mixer, whatever its state's tree (log-linear levels)."""
    from linear_jax.layers import MIXERS
    from linear_jax.models.flops import mixing_flops
    for name in MIXERS:
        cfg = LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, mixer=name)
        model = nnx.eval_shape(lambda cfg=cfg: LM(cfg, rngs=nnx.Rngs(0)))
        f = mixing_flops(model.layer_mixer(0), 64)
        assert np.isfinite(f) and f > 0, name


def test_log_lines_and_result_without_a_progress_bar(tmp_path, caplog, absl_info):
    caplog.set_level(logging.INFO)
    c = tiny(tmp_path, mesh__data=1, train__steps=7, train__log_every=2,
             train__checkpoint_every=0, eval__every=7)
    c.train.peak_flops = 1e12
    result = loop.train(c, devices=jax.devices()[:1])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")
             and "tok/s" in r.getMessage()]
    assert [ln.split(",")[0] for ln in lines] == ["step 1/7", "step 2/7", "step 4/7",
                                                  "step 6/7", "step 7/7"], lines
    assert all(" loss " in ln and " lr " in ln and " ms" in ln and "MFU " in ln for ln in lines)
    assert any("compiled in" in r.getMessage() for r in caplog.records)
    train = read_jsonl(tmp_path / "metrics.jsonl", "train")
    rates = [r["tokens_per_s"] for r in train]
    # the last step is fetched right after the one before it (the eval flush): no burst
    assert rates[-1] <= 3 * np.median(rates[:-1]), rates
    assert all(0 < r["mfu"] < 1 and r["step_time_s"] > 0 for r in train), train
    tp = result["throughput"]
    assert tp["step_time_s"] > 0 and 0 < tp["mfu"] < 1 and tp["peak_flops"] == 1e12
    assert result["compile"]["compile_s"] > 0
    json.dumps(result)                              # what experiments/train.py writes
