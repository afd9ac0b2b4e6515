"""TensorBoard event files written without TensorFlow: CRC-32C against its check value, records
read back, a training run's scalars equal its metrics.jsonl, and (where the `tensorboard` package
is installed) TensorBoard's own loader reads the file."""

import jax
import numpy as np
import pytest

from linear_jax.training import loop
from linear_jax.training.metrics import read_jsonl
from linear_jax.training.tensorboard import EventWriter, crc32c, read_scalars
from tests.training.test_train import tiny


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283          # the standard CRC-32C check value


def test_scalars_round_trip(tmp_path):
    w = EventWriter(tmp_path)
    w.scalars(1, {"train/loss": 3.5, "train/accuracy": 0.25})
    w.scalars(300, {"eval/loss": 0.125})
    assert read_scalars(w.path) == [(1, "train/loss", 3.5), (1, "train/accuracy", 0.25),
                                    (300, "eval/loss", 0.125)]


def test_tensorboard_reads_the_file(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    EventWriter(tmp_path).scalars(7, {"train/loss": 1.5})
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(7, 1.5)]


def test_training_run_writes_its_metrics(tmp_path):
    loop.train(tiny(tmp_path, mesh__data=1, train__steps=3, train__checkpoint_every=0,
                    eval__every=3, train__tensorboard=True), devices=jax.devices()[:1])
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars = {(s, tag): v for s, tag, v in read_scalars(events)}
    for r in read_jsonl(tmp_path / "metrics.jsonl"):
        np.testing.assert_allclose(scalars[(r["step"], f"{r['split']}/loss")], r["loss"],
                                   rtol=1e-6)
