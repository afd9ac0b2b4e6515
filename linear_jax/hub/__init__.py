"""Pretrained checkpoints in transformers' format: `load(dir) -> LM` and `save(model, dir)`.

A checkpoint directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`), as `save_pretrained` writes them. Supported architectures are
the keys of `FAMILIES` (README: "Pretrained checkpoints"); anything in a checkpoint that our
layers cannot compute exactly is refused with a ValueError naming the field or tensor, before
any device memory is allocated. Neither torch nor transformers is needed.
"""

from linear_jax.hub.core import DEFAULT_RULES, FAMILIES, OVERRIDES, load, read_config, save

__all__ = ["DEFAULT_RULES", "FAMILIES", "OVERRIDES", "load", "read_config", "save"]
