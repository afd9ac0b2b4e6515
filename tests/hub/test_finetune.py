"""experiments/configs/finetune_hub.py: a run starts from the checkpoint's weights (`init_from`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.configs import finetune_hub
from linear_jax import hub
from linear_jax.models import LM, LMConfig
from linear_jax.training import loop


@pytest.mark.smoke      # a training run (compiles the train and eval steps)
def test_finetune_starts_from_checkpoint(tmp_path):
    config = LMConfig(vocab_size=256, d_model=16, num_layers=1, num_heads=1, mixer="mamba",
                      ffn="none", mixer_options={"mamba": {"d_state": 4}}, tie_embeddings=True,
                      norm_eps=1e-5)
    hub.save(LM(config, rngs=nnx.Rngs(3)), tmp_path / "ckpt")
    c = finetune_hub.get_config(str(tmp_path / "ckpt"))
    c.workdir = str(tmp_path / "run")
    c.model.dtype = "float32"
    c.task.seq_len = 16
    # lr 0: the run's weights must stay the checkpoint's, not a fresh initialisation
    c.train.update(steps=2, batch_size=2, lr=0.0, warmup_steps=1, checkpoint_every=0,
                   progress=False, log_every=1)
    c.eval.update(every=100, batches=1, batch_size=2)
    devices = jax.devices()[:1]
    loop.train(c, devices=devices)
    trained = nnx.state(loop.load_model(c, devices=devices), nnx.Param)
    want = nnx.state(hub.load(tmp_path / "ckpt"), nnx.Param)
    for (path, a), (_, b) in zip(nnx.to_flat_state(trained), nnx.to_flat_state(want),
                                 strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                      err_msg=str(path))
