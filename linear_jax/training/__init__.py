"""The training harness: mesh and sharding rules, optimiser, sharded train/eval steps, orbax
checkpoints, metrics, deterministic data (synthetic tasks, packed text) and the loop.

`train(config)` runs a whole experiment from an ml_collections config
(`experiments/configs/*.py`), `train_seeds(config, seeds)` several seeds of it together (vmapped
on one device); the pieces are importable on their own from a notebook.
"""

from linear_jax.training.loop import train
from linear_jax.training.mesh import ConfigError, mesh_from_config
from linear_jax.training.seeds import train_seeds

__all__ = ["ConfigError", "mesh_from_config", "train", "train_seeds"]
