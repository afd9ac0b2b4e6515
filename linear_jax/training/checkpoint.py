"""Periodic asynchronous checkpoints with orbax: model, optimiser and data position together.

A checkpoint at step s holds the train state after s updates and the index of the next batch, so a
run killed at any point resumes from the newest complete checkpoint and replays exactly the steps
an uninterrupted run would have taken (orbax writes to a temporary directory and renames it when
complete, so a kill during a save leaves the previous checkpoint intact). The newest `keep` are
kept. Restoring places every array directly with its target sharding.
"""

from __future__ import annotations

import logging as std_logging
import pathlib

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    def __init__(self, directory, *, every: int, keep: int = 3):
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every, 1), create=True,
            enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                              item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_position: int, *, force: bool = False,
             meta: dict | None = None) -> bool:
        """Starts an asynchronous save when `step` is due (or `force`); returns whether it did.
        `meta` (JSON) is saved beside the data position: what a resumed run must also restore
        (`read_meta`)."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        data = {"position": int(data_position), **({"meta": meta} if meta is not None else {})}
        saved = self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=force)
        if saved:
            logging.info("checkpoint: saving step %d (async)", step)
        return saved

    def restore(self, abstract_state):
        """(state, data position, step) of the newest checkpoint, or None when there is none.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings (from `eval_shape`).
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        logging.info("checkpoint: restored step %d", step)
        return restored["state"], int(restored["data"]["position"]), step

    def read_meta(self, step: int) -> dict | None:
        """The `meta` saved with checkpoint `step` (None if it had none)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            data=ocp.args.JsonRestore()))
        return restored["data"].get("meta")

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, the restore target for `tree`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class _DropOrbaxInfo(std_logging.Filter):
    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_logs() -> None:
    """Hides orbax's per-save INFO lines (dozens per checkpoint); its warnings still show."""
    for handler in (*std_logging.getLogger().handlers, logging.get_absl_handler()):
        handler.addFilter(_DropOrbaxInfo())
