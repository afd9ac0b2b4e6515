"""Multi-process training: two local CPU processes joined by `jax.distributed.initialize()` over a
loopback coordinator (2 CPU devices each, gloo collectives) train through `experiments.train
--distributed` on one global mesh, and their losses equal a single-device run's; only process 0
writes the metrics and the result."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from linear_jax.training.metrics import read_jsonl
from tests.training.test_train import ROOT, TINY, XLA_FLAGS, _flags

STEPS = {"train.steps": 4, "train.checkpoint_every": 0, "eval.every": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "XLA_FLAGS": XLA_FLAGS}


def test_two_processes_match_single_device(tmp_path, single_device_run):
    workdir, port = tmp_path / "two", _free_port()
    # data x fsdp = 2 x 2 over the 4 devices of both processes: parameters sharded across them
    conf = {**TINY, **STEPS, "mesh.data": 2, "mesh.fsdp": 2, "train.checkpoint_every": 0}
    cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/quickstart.py",
           f"--config.workdir={workdir}", *_flags(conf), "--distributed",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=150))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
        assert f"process {i} of 2, 2 local / 4 global devices" in err
        assert "final (step 4" in out

    # the single-device run (tests/training/conftest.py, shared with test_train.py)
    ref, one_eval_loss = single_device_run
    records = read_jsonl(workdir / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    # one writer: every (step, split) once
    assert len({(r["step"], r["split"]) for r in records}) == len(records)
    assert sorted(train) == sorted(ref) == [1, 2, 3, 4]
    np.testing.assert_allclose([train[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
    result = json.loads((workdir / "result.json").read_text())
    np.testing.assert_allclose(result["eval"]["eval"]["loss"], one_eval_loss, rtol=1e-5)
