"""Quick start: multi-query associative recall (8 key-value pairs, then the 8 keys queried again,
in 64 tokens) with a 2-layer DeltaNet (width 64, short convolutions of width 4); about 2 minutes
on a laptop CPU, to an eval accuracy near 1 (chance: 1/32).

    python -m experiments.train --config=experiments/configs/quickstart.py
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/quickstart"
    c.task.update(name="mqar", seq_len=64, params={"num_kv_pairs": 8})
    c.model.update(d_model=64, num_layers=2, num_heads=2, mixer="deltanet",
                   mixer_options={"deltanet": {"conv_size": 4}})
    c.train.update(steps=600, batch_size=64, lr=3e-3, warmup_steps=60, checkpoint_every=200)
    c.eval.update(every=100, batches=8, batch_size=64)
    return c
