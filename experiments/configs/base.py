"""Defaults shared by every task config; a task config overrides what it needs.

Sections: `task` (data), `model` (fields of `linear_jax.models.LMConfig`; vocab_size comes from
the task unless set), `train` (optimiser, steps, batch, logging, checkpoints), `eval`, `mesh` (axis
sizes, -1 fills the devices) and `sharding.rules` (logical parameter axis -> mesh axes).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.seeds = ()          # several seeds: trained together, vmapped (linear_jax.training.seeds)
    c.workdir = "runs/default"

    # min_seq_len > 0: training lengths drawn per batch from [min_seq_len, seq_len]; score "last":
    # only the last token is scored (linear_jax.training.data)
    c.task = ml_collections.ConfigDict({"name": "mqar", "seq_len": 64, "params": {},
                                        "min_seq_len": 0, "score": "all"})

    # bfloat16 compute from float32 master weights; "float32" for exact comparisons. init_std 0
    # stands for d_model^-1/2 (resolved when the model is built, so it follows a width override):
    # GPT-2's 0.02 is set for widths of 1000-2000 and holds gated mixers at chance at width 64
    c.model = ml_collections.ConfigDict({
        "d_model": 64, "num_layers": 2, "num_heads": 2, "mixer": "gla", "impl": "auto",
        "dtype": "bfloat16", "param_dtype": "float32", "init_std": 0.02,
    })

    c.train = ml_collections.ConfigDict({
        "steps": 1000, "batch_size": 64, "microbatches": 1,
        "lr": 3e-3, "warmup_steps": 100, "min_lr_ratio": 0.1, "b1": 0.9, "b2": 0.95,
        "weight_decay": 0.1, "clip_norm": 1.0, "aux_loss_weight": 0.01,
        "log_every": 10, "checkpoint_every": 500, "keep_checkpoints": 2, "progress": True,
        "tensorboard": False,     # also write <workdir>/tensorboard/events.out.tfevents.*
        "peak_flops": 0.0,        # per device, for MFU; 0: linear_jax.models.flops.PEAKS
        "stop_accuracy": 0.0,     # multi-seed runs: stop once every seed's eval accuracy >= it
    })

    # length_range (lo, hi): also evaluate on rows whose lengths are drawn from [lo, hi]
    c.eval = ml_collections.ConfigDict({"every": 250, "batches": 4, "batch_size": 64,
                                        "seq_lens": (), "length_range": ()})

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "seq": 1})

    # Unnamed dimensions and names without a rule are replicated.
    c.sharding = ml_collections.ConfigDict({"rules": (
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("experts", None),
    )})
    return c
