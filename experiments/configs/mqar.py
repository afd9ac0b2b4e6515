"""Multi-query associative recall (Zoology): 16 key-value pairs in 128 tokens, 2-layer model.

    python -m experiments.train --config=experiments/configs/mqar.py --config.model.mixer=gla
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/mqar"
    c.task.update(name="mqar", seq_len=128, params={"num_kv_pairs": 16})
    c.model.update(d_model=64, num_layers=2, num_heads=2, mixer="gla", init_std=0.0,
                   mixer_options={"gla": {"conv_size": 4}})
    c.train.update(steps=800, batch_size=64, lr=3e-3, warmup_steps=80)
    c.eval.update(every=200, batches=8)
    return c
