"""Fine-tunes a pretrained transformers checkpoint (`linear_jax.hub`: any family it
loads) on the Shakespeare corpus of `lm_shakespeare.py`, byte-level, packed rows with segment ids.

    python -m experiments.train --config=experiments/configs/finetune_hub.py:/path/to/checkpoint

The path is a directory with config.json and model.safetensors (or shards and their index), as
`save_pretrained` or `linear_jax.hub.save` writes them. The model section is the checkpoint's own
(`hub.read_config`), computed in bfloat16 from float32 master weights; the run starts from its
weights (`init_from`) and resumes from its own checkpoints after that. Bytes are token ids 0-255,
so the checkpoint's vocabulary must hold at least 256 entries; a checkpoint trained with another
tokenizer is being taught bytes from scratch at its embedding, which a short run shows as a fast
fall of the loss from the first steps, not as transfer.
"""

import dataclasses

import ml_collections

from experiments.configs.lm_shakespeare import get_config as shakespeare
from linear_jax import hub


def model_fields(path: str, **overrides) -> dict:
    """The LMConfig of the checkpoint at `path` as plain config fields."""
    c = hub.read_config(path, **overrides)
    fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    fields["mixer_options"] = {name: dict(kw) for name, kw in c.mixer_options}
    fields["kernel_config"] = ()
    return {k: v for k, v in fields.items() if v is not None}


def get_config(path: str = ""):
    if not path:
        raise ValueError("finetune_hub.py needs the checkpoint directory: "
                         "--config=experiments/configs/finetune_hub.py:/path/to/checkpoint")
    c = shakespeare()
    c.workdir = "runs/finetune_hub"
    c.init_from = path
    c.model = ml_collections.ConfigDict(model_fields(path, dtype="bfloat16",
                                                     param_dtype="float32"))
    c.train.update(steps=300, batch_size=16, lr=3e-4, warmup_steps=30, weight_decay=0.0)
    c.eval.update(every=100, batches=8, batch_size=16)
    return c
