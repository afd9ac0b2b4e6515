"""Selective copying (Mamba, section 3.1): 8 data tokens among blanks in 64, copied after a marker.

    python -m experiments.train --config=experiments/configs/selective_copy.py
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/selective_copy"
    c.task.update(name="selective_copy", seq_len=64, params={"num_tokens": 8, "num_symbols": 8})
    c.model.update(d_model=64, num_layers=2, num_heads=2, mixer="gla", init_std=0.0,
                   mixer_options={"gla": {"conv_size": 4}})
    c.train.update(steps=800, batch_size=64, lr=3e-3, warmup_steps=80)
    c.eval.update(every=200, batches=8)
    return c
