"""Induction heads: a random sequence of 32 tokens (32 symbols) and its repeat; the repeat is
predictable only by copying what followed the current token the first time.

    python -m experiments.train --config=experiments/configs/induction.py
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/induction"
    c.task.update(name="induction", seq_len=64, params={"num_symbols": 32})
    c.model.update(d_model=64, num_layers=2, num_heads=2, mixer="gla", init_std=0.0,
                   mixer_options={"gla": {"conv_size": 4}})
    c.train.update(steps=800, batch_size=64, lr=3e-3, warmup_steps=80)
    c.eval.update(every=200, batches=8)
    return c
