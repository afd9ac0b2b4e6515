"""State tracking: parity, modular addition (mod 5) or S5 permutation composition, chosen after
the colon; trained at length 32 and evaluated at 32, 64 and 128 (length extrapolation).

    python -m experiments.train --config=experiments/configs/state_tracking.py:s5
    python -m experiments.train --config=experiments/configs/state_tracking.py:modular_addition

The model is DeltaNet with beta in [0, 2] (`allow_neg_eigval`: the transition I - beta k k^T can
have eigenvalue -1, which parity and S5 need; Grazzi et al. 2025); compare with
`--config.model.mixer_options.deltanet.allow_neg_eigval=False` (beta in [0, 1]), or with
DeltaProduct (`--config.model.mixer=delta_product`: two Householder steps per token, whose product
can rotate, which modular addition and S5 need; Siems et al. 2025). Computation is
in float32; `impl` is the library's default (the chunk form on a CPU, the kernels on a GPU).
"""

from experiments.configs.base import base_config

TASKS = ("parity", "modular_addition", "s5")


def get_config(task: str = "parity"):
    if task not in TASKS:
        raise ValueError(f"state_tracking: task {task!r} is not one of {TASKS}")
    c = base_config()
    c.workdir = f"runs/{task}"
    c.task.update(name=task, seq_len=32, params={"modulus": 5} if task == "modular_addition"
                  else {})
    c.model.update(d_model=64, num_layers=2, num_heads=2, mixer="deltanet", dtype="float32",
                   mixer_options={"deltanet": {"allow_neg_eigval": True},
                                  "delta_product": {"allow_neg_eigval": True, "gated": False,
                                                    "num_householder": 2}})
    c.train.update(steps=1000, batch_size=64, lr=2e-3, warmup_steps=100, weight_decay=0.0)
    c.eval.update(every=250, batches=4, seq_lens=(64, 128))
    return c
