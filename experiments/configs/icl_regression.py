"""In-context linear regression: 24 examples of x in {-1, 1}^4, y = w.x with a per-sequence w.

    python -m experiments.train --config=experiments/configs/icl_regression.py
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/icl_regression"
    c.task.update(name="icl_regression", seq_len=120, params={"dim": 4})
    c.model.update(d_model=64, num_layers=2, num_heads=2, mixer="gla", init_std=0.0,
                   mixer_options={"gla": {"conv_size": 4}})
    c.train.update(steps=800, batch_size=64, lr=3e-3, warmup_steps=80)
    c.eval.update(every=200, batches=8)
    return c
