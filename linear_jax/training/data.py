"""Deterministic, resumable batch sources.

A source is addressed by batch index: `source.batch(i)` is a pure function of (seed, i), so the
data position saved in a checkpoint is one integer and a resumed run sees exactly the batches an
uninterrupted run would. Every host builds the same global batch and hands the devices their
slices (`to_device`), so the data do not depend on the number of hosts or devices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from linear_jax.training import synthetic, text
from linear_jax.training.mesh import ConfigError

_SPLIT_IDS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    name: str
    seq_len: int
    batch_size: int
    seed: int
    split: str = "train"
    params: tuple = ()              # generator keyword arguments, as (key, value) pairs

    @property
    def vocab_size(self) -> int:
        return synthetic.vocab_size(self.name, **dict(self.params))

    def batch(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        gen = synthetic.GENERATORS[self.name]
        return gen(rng, self.batch_size, self.seq_len, **dict(self.params))


@functools.lru_cache(maxsize=4)
def _packed(seq_len: int, validation_docs: tuple[str, ...]):
    train, val, corpus = text.load_corpus(validation_docs)
    return {split: text.pack([text.encode(d) for d in docs], seq_len + 1)
            for split, docs in (("train", train), ("eval", val))}, corpus


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Packed rows of the text corpus; train rows are reshuffled every epoch, eval rows are not."""

    seq_len: int
    batch_size: int
    seed: int
    split: str = "train"
    validation_docs: tuple[str, ...] = text.DEFAULT_VALIDATION_PLAYS
    vocab_size: int = text.VOCAB_SIZE

    @property
    def num_rows(self) -> int:
        return len(self._rows()[0])

    @property
    def corpus(self) -> str:
        return _packed(self.seq_len, tuple(self.validation_docs))[1]

    def _rows(self):
        return _packed(self.seq_len, tuple(self.validation_docs))[0][self.split]

    def batch(self, index: int) -> dict[str, np.ndarray]:
        ids, seg = self._rows()
        n = len(ids)
        flat = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        if self.split == "train":
            epochs, offsets = np.divmod(flat, n)
            perms = {e: np.random.default_rng([self.seed, e]).permutation(n) for e in set(epochs)}
            rows = np.array([perms[e][o] for e, o in zip(epochs, offsets, strict=True)])
        else:
            rows = flat % n
        return text.rows_to_batch(ids[rows], seg[rows])


def make_source(task, *, split: str, batch_size: int, seed: int, seq_len: int | None = None):
    """A source from the `task` part of a config (name, seq_len, params / validation_docs)."""
    seq_len = seq_len or task.seq_len
    if task.name == "lm":
        return TextSource(seq_len, batch_size, seed, split, tuple(task.validation_docs))
    if task.name not in synthetic.GENERATORS:
        raise ConfigError(f"unknown task {task.name!r}; known: "
                         f"{sorted(synthetic.GENERATORS) + ['lm']}")
    params = tuple(sorted(dict(task.get("params", {})).items()))
    return SyntheticSource(task.name, seq_len, batch_size, seed, split, params)


def to_device(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """The global batch as arrays laid out by `sharding`; each host fills its own devices."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}
