"""The training harness end to end on a tiny model: sharded == single device, resume after a
kill == uninterrupted, bad configs fail with a message, a diverging run stops."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs.quickstart import get_config
from linear_jax.training import loop
from linear_jax.training.mesh import ConfigError
from linear_jax.training.metrics import read_jsonl
from tests.utils import FAST_COMPILE_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"task.seq_len": 32, "task.params.num_kv_pairs": 4, "model.d_model": 32,
        "model.num_layers": 1, "model.num_heads": 2, "model.dtype": "float32",
        "train.batch_size": 8, "train.warmup_steps": 2, "train.log_every": 1,
        "train.progress": False, "eval.batch_size": 8, "eval.batches": 1}


def _flags(over: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in over.items()]


def tiny(workdir, **over):
    c = get_config()
    for k, v in {**TINY, **{k.replace("__", "."): v for k, v in over.items()}}.items():
        *path, leaf = k.split(".")
        node = c
        for p in path:
            node = node[p]
        node[leaf] = v
    c.workdir = str(workdir)
    return c


def _losses(workdir, split="train"):
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl", split)}


def test_sharded_8_devices_matches_single_device(tmp_path, single_device_run):
    assert jax.device_count() == 8, "tests/conftest.py provides 8 host devices"
    steps = {"train__steps": 4, "train__checkpoint_every": 0, "eval__every": 4}
    # the single-device run (tests/training/conftest.py, shared with test_distributed.py)
    a, one_eval_loss = single_device_run
    # fsdp x tensor x seq = 2 x 2 x 2 (each sequence split in two: the quickstart's mixer and its
    # short conv run sequence-parallel), and two accumulated microbatches of 4 rows
    eight = loop.train(tiny(tmp_path / "eight", mesh__data=1, mesh__fsdp=2, mesh__tensor=2,
                            mesh__seq=2, train__microbatches=2, **steps))
    b = _losses(tmp_path / "eight")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    np.testing.assert_allclose(eight["eval"]["eval"]["loss"], one_eval_loss, rtol=1e-5)
    assert a[4] < a[1]                                        # it trains


def test_gathered_positions_train_the_same_sequence_parallel(tmp_path):
    """`task.gather` (batches carry the scored positions; the head runs on those rows only) on a
    sequence-parallel mesh, where the rows are gathered from an activation split along T: the
    same losses as on one device."""
    steps = {"train__steps": 2, "train__checkpoint_every": 0, "eval__every": 2,
             "task__gather": True}
    one = loop.train(tiny(tmp_path / "one", mesh__data=1, **steps), devices=jax.devices()[:1])
    seq = loop.train(tiny(tmp_path / "seq", mesh__data=1, mesh__seq=2, **steps),
                     devices=jax.devices()[:2])
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "seq")
    assert sorted(a) == sorted(b) == [1, 2]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    np.testing.assert_allclose(seq["eval"]["eval"]["loss"], one["eval"]["eval"]["loss"],
                               rtol=1e-5)


# the subprocesses compile as the tests do (tests/utils.py: about half the compile time), on their
# own devices
XLA_FLAGS = FAST_COMPILE_XLA_FLAGS


def _env():
    # one CPU device in the subprocesses, whatever the parent has
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, "XLA_FLAGS": XLA_FLAGS}


def _cli(workdir, **over):
    conf = {**TINY, "train.steps": 40, "train.checkpoint_every": 5, "eval.every": 40,
            **{k.replace("__", "."): v for k, v in over.items()}}
    return [sys.executable, "-m", "experiments.train",
            "--config=experiments/configs/quickstart.py", f"--config.workdir={workdir}",
            *_flags(conf)]


def test_resume_after_kill_replays_the_same_curve(tmp_path):
    killed = tmp_path / "killed"
    # the resumed run loads the train step the killed run compiled (the same program) from JAX's
    # persistent cache: compiling it again would cost seconds and check nothing more
    env = {**_env(), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "compiled"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.Popen(_cli(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics_file = killed / "metrics.jsonl"
    deadline = time.time() + 600         # a busy 2-core machine takes minutes to compile and log
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 22:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    steps_logged = max(_losses(killed))
    assert 20 <= steps_logged < 40

    out = subprocess.run(_cli(killed), cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "checkpoint: restored step" in out.stderr
    assert "final (step 40" in out.stdout

    fresh = loop.train(tiny(tmp_path / "fresh", mesh__data=1, train__steps=40,
                            train__checkpoint_every=0, eval__every=40),
                       devices=jax.devices()[:1])
    a, b = _losses(killed), _losses(tmp_path / "fresh")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-6)
    np.testing.assert_allclose(_losses(killed, "eval")[40], fresh["eval"]["eval"]["loss"],
                               rtol=1e-6)


@pytest.mark.parametrize("over, message", [
    ({"model__mixer": "no_such_mixer"}, "no_such_mixer"),
    ({"model__num_heads": 3}, "num_heads=3 must divide"),
    ({"mesh__data": 3}, "mesh"),
    ({"train__batch_size": 6, "mesh__data": 4}, "batch_size"),
    ({"task__name": "no_such_task"}, "unknown task"),
    ({"mesh__seq": 2, "model__mixer": "mamba"}, "no sequence-parallel form"),
    ({"mesh__seq": 4, "task__seq_len": 30}, "multiple of seq = 4"),
])
def test_bad_config_raises_config_error(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        loop.train(tiny(tmp_path, **over), devices=jax.devices()[:4])


def test_cli_bad_config_exits_with_message_not_traceback(tmp_path):
    out = subprocess.run(_cli(tmp_path, **{"model.mixer": "no_such_mixer"}), cwd=ROOT,
                         env=_env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert "error: model:" in out.stderr and "no_such_mixer" in out.stderr
    assert "Traceback" not in out.stderr


def test_diverging_run_stops_on_nan(tmp_path):
    result = loop.train(tiny(tmp_path, mesh__data=1, train__steps=30, train__lr=1e30,
                             train__clip_norm=0.0, train__checkpoint_every=0, eval__every=30),
                        devices=jax.devices()[:1])
    assert result["stopped"] == "nan" and result["step"] < 30
    last = read_jsonl(tmp_path / "metrics.jsonl", "train")[-1]
    assert last["step"] == result["step"]
    assert not np.isfinite([float(last["loss"]), float(last["grad_norm"])]).all()
