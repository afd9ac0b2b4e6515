"""Shared by the training tests: the single-device run that the 8-device sharded run
(test_train.py) and the two-process run (test_distributed.py) must both equal, trained once per
session. Under pytest-xdist the workers share it through a file in the session's base temporary
directory (the parent of each worker's own), written by whichever worker needs it first."""

import fcntl
import json
import os

import jax
import pytest

from linear_jax.training import loop


def _train_single_device(workdir) -> dict:
    from tests.training.test_train import _losses, tiny

    one = loop.train(tiny(workdir, mesh__data=1, train__steps=4, train__checkpoint_every=0,
                          eval__every=4), devices=jax.devices()[:1])
    return {"train": sorted(_losses(workdir).items()),
            "eval_loss": float(one["eval"]["eval"]["loss"])}


@pytest.fixture(scope="session")
def single_device_run(tmp_path_factory):
    """({step: train loss}, final eval loss) of `test_train.tiny` on one device (mesh data = 1),
    4 steps, no checkpoints, one eval at step 4."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:            # one process: nothing to share
        ref = _train_single_device(tmp_path_factory.mktemp("single_device"))
    else:
        shared = tmp_path_factory.getbasetemp().parent           # this session's, every worker's
        with open(shared / "single_device_run.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)                     # one trains, the others wait
            path = shared / "single_device_run.json"
            if path.exists():
                ref = json.loads(path.read_text())
            else:
                ref = _train_single_device(tmp_path_factory.mktemp("single_device"))
                path.write_text(json.dumps(ref))
    return {int(s): loss for s, loss in ref["train"]}, ref["eval_loss"]
