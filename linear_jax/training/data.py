"""Deterministic, resumable batch sources.

A source is addressed by batch index: `source.batch(i)` is a pure function of (seed, i), so the
data position saved in a checkpoint is one integer and a resumed run sees exactly the batches an
uninterrupted run would. Every host builds the same global batch and hands the devices their
slices (`to_device`), so the data do not depend on the number of hosts or devices.

Protocols of the papers (Grazzi et al. 2025 after Deletang et al. 2023) beyond a task's generator:
`task.min_seq_len` draws each training batch's length uniformly from [min_seq_len, seq_len] (one
length per batch), and `task.score = "last"` scores only the last token of a sequence (parity of
the whole string instead of every prefix). Rows shorter than `seq_len` are padded at the end with
token 0 and weight 0: the models are causal, so the padding changes nothing before it, and every
batch keeps one shape (one compilation). Evaluation sources have fixed lengths (`eval.seq_lens`),
or, for `eval.length_range = (lo, hi)`, a length per row drawn from [lo, hi] (the papers' test sets
mix their lengths within one set, so every batch holds every part of the range).

`task.gather = True` (tasks that score a few positions of each row: MQAR's queries, `score =
"last"`) adds `positions` [B, P] to every batch, the scored positions of each row in order (P the
most any row of the batch scores), and gives `targets` and `mask` as [B, P] at those positions;
the model then applies its head to those P positions only (`LM(positions=...)`). The loss and its
gradients are the full batch's; what is saved is the [B, T, vocab] logits, which at MQAR's
vocabulary of 8192 dominate a small model's step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from linear_jax.training import synthetic, text
from linear_jax.training.mesh import ConfigError

# "tune": held-out tasks a baseline fits its own parameters on (`regression.baselines`)
_SPLIT_IDS = {"train": 0, "eval": 1, "tune": 2}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    name: str
    seq_len: int
    batch_size: int
    seed: int
    split: str = "train"
    params: tuple = ()              # generator keyword arguments, as (key, value) pairs
    min_seq_len: int = 0            # > 0: each batch's length drawn from [min_seq_len, seq_len]
    score: str = "all"              # "last": only the last token of each sequence is scored
    gather: bool = False            # batches carry the scored positions only (module docstring)

    @property
    def vocab_size(self) -> int:
        return synthetic.vocab_size(self.name, **dict(self.params))

    @property
    def num_classes(self) -> int | None:
        return synthetic.num_classes(self.name, **dict(self.params))

    @property
    def regression(self) -> bool:
        return self.name in synthetic.REGRESSION

    def batch(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        draw = lambda: int(rng.integers(self.min_seq_len, self.seq_len + 1))   # noqa: E731
        if not self.min_seq_len:
            out = self._rows(rng, self.batch_size, self.seq_len)
        elif self.split == "train":                # one length per batch: the papers' training
            out = self._rows(rng, self.batch_size, draw())
        else:
            rows = [self._rows(rng, 1, draw()) for _ in range(self.batch_size)]
            out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        return gather_scored(out) if self.gather else out

    def _rows(self, rng, n: int, length: int) -> dict[str, np.ndarray]:
        out = synthetic.GENERATORS[self.name](rng, n, length, **dict(self.params))
        if self.score == "last":
            out["mask"] = np.zeros_like(out["mask"])
            out["mask"][:, -1] = 1.0
        return _pad(out, self.seq_len)


def gather_scored(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`targets` and `mask` at each row's scored positions (mask > 0), in order, with those
    positions as `positions` [B, P]; P is the most any row scores, and a row that scores fewer
    is padded with position 0 at weight 0."""
    scored = batch["mask"] > 0
    P = max(int(scored.sum(axis=1).max()), 1)
    positions = np.sort(np.argsort(~scored, axis=1, kind="stable")[:, :P], axis=1)
    take = lambda a: np.take_along_axis(a, positions, axis=1)    # noqa: E731
    keep = take(scored)
    return {**batch, "positions": np.where(keep, positions, 0).astype(np.int32),
            "targets": np.where(keep, take(batch["targets"]), 0).astype(batch["targets"].dtype),
            "mask": np.where(keep, take(batch["mask"]), 0).astype(np.float32)}


def _pad(batch: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    extra = seq_len - batch["mask"].shape[1]
    if not extra:
        return batch
    return {k: np.pad(v, [(0, 0), (0, extra)] + [(0, 0)] * (v.ndim - 2)) for k, v in batch.items()}


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
    num_classes = None              # next-byte prediction: no chance level worth scaling by
    regression = False

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


def make_source(task, *, split: str, batch_size: int, seed: int, seq_len: int | None = None,
                min_seq_len: int = 0):
    """A source from the `task` part of a config (name, seq_len, params / validation_docs);
    `min_seq_len` > 0 on an eval split: each row's length drawn from [min_seq_len, seq_len]."""
    seq_len = seq_len or task.seq_len
    if task.name == "lm":
        if min_seq_len:
            raise ConfigError("eval.length_range applies to synthetic tasks; task 'lm' reads "
                              "fixed-length rows of its corpus")
        if task.get("gather", False):
            raise ConfigError("task.gather applies to synthetic tasks that score a few "
                              "positions per row; task 'lm' scores every position")
        return TextSource(seq_len, batch_size, seed, split, tuple(task.validation_docs))
    if task.name not in synthetic.GENERATORS:
        raise ConfigError(f"unknown task {task.name!r}; known: "
                         f"{sorted(synthetic.GENERATORS) + ['lm']}")
    params = tuple(sorted(dict(task.get("params", {})).items()))
    score = task.get("score", "all")
    if score not in ("all", "last"):
        raise ConfigError(f"task.score must be 'all' or 'last', got {score!r}")
    min_len = task.get("min_seq_len", 0) if split == "train" else min_seq_len
    if min_len and not 1 <= min_len <= seq_len:
        what = "task.min_seq_len" if split == "train" else "eval.length_range's low end"
        raise ConfigError(f"{what}={min_len} must be in [1, {seq_len}]")
    return SyntheticSource(task.name, seq_len, batch_size, seed, split, params, min_len, score,
                           bool(task.get("gather", False)))


def to_device(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """The global batch as arrays laid out by `sharding`; each host fills its own devices."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}
