"""Synthetic tasks: pure NumPy generators of token batches, seeded.

Every generator has the signature `gen(rng, batch, seq_len, **task_params)` and returns
`{"tokens": int32 [B, T], "targets": int32 [B, T], "mask": float32 [B, T]}`: the model reads
`tokens[:, t]` and is scored on predicting `targets[:, t]` where `mask[:, t] > 0`. `vocab_size(name,
**task_params)` is the number of token ids a model needs. Token 0 is padding/blank in every task.

- mqar: multi-query associative recall (Arora et al. 2023, *Zoology*; Based): key-value pairs, then
  the keys again at random later positions; each query must be answered with its value.
- parity / modular_addition / s3 / s5: state tracking (Grazzi et al. 2024, *Unlocking
  state-tracking in linear RNNs through negative eigenvalues*; Merrill et al. 2024): after every
  input, output the running parity of the bits / running sum mod m / running composition of S3 or
  S5 permutations (the group word problems of DeltaProduct, Siems et al. 2025).
- icl_regression: noise-free in-context linear regression (Garg et al. 2022) with discrete values:
  x in {-1, +1}^d, a per-sequence w in {-1, 0, 1}^d, y = w.x; the model must predict y from x.
- selective_copy: data tokens scattered among blanks; after a separator, emit them in order
  (Gu & Dao 2023, *Mamba*, section 3.1).
- induction: a random token sequence repeated; in the repeat every next token is predictable by
  copying what followed the current token before (Olsson et al. 2022, induction heads).
- induction_heads: the Mamba paper's version (section 4.1, after H3): random symbols, one trigger
  token followed by the answer somewhere, and the trigger again as the last token, whose next
  token (the answer) is the only one scored; evaluated far past the training length.
- modular_arithmetic, modular_arithmetic_brackets: expressions mod m, answered at the last token
  (`linear_jax.training.formal`).
- linear_regression: in-context regression over real-valued tokens (x_i, y_i), x in R^d
  (`linear_jax.training.regression`); its tokens are float [B, T, d + 1] and its targets float.

`num_classes(name, **task_params)` is the number of answers a scored position can take (for the
scaled accuracy (acc - 1/C) / (1 - 1/C), 0 at chance), None where that is not a classification.
"""

from __future__ import annotations

import itertools

import numpy as np

from linear_jax.training import formal, regression


def _batch(tokens, targets, mask) -> dict[str, np.ndarray]:
    return {"tokens": tokens.astype(np.int32), "targets": targets.astype(np.int32),
            "mask": mask.astype(np.float32)}


def _smallest(r: np.ndarray, n: int, uniform: bool = False) -> np.ndarray:
    """`np.argsort(r, axis=1)[:, :n]` (the columns of each row's n smallest values, in order)
    without sorting whole rows: at Zoology's 4096 keys the full sort was most of a batch's cost.
    `uniform` (r drawn uniformly from [0, 1), n at most 1/8 of a row): only the values below
    4 n / cols are sorted, about 4 n a row, where a row's n smallest almost surely lie (a row with
    fewer sends every row the general way); the argpartition of 256 rows of 4096 was 3/4 of an
    MQAR batch's time."""
    B, cols = r.shape
    if uniform and 8 * n <= cols:
        flat = np.flatnonzero(r < 4.0 * n / cols)          # row-major: grouped by row
        rows = flat // cols
        counts = np.bincount(rows, minlength=B)
        if counts.min() >= n:
            # by value, then (stable) by row: each row's candidates in increasing order
            by_value = np.argsort(r.ravel()[flat])
            order = by_value[np.argsort(rows[by_value], kind="stable")]
            starts = np.cumsum(counts) - counts
            return (flat[order] % cols)[starts[:, None] + np.arange(n)]
    if n >= cols:
        return np.argsort(r, axis=1)[:, :n]
    idx = np.argpartition(r, n, axis=1)[:, :n]
    return np.take_along_axis(idx, np.argsort(np.take_along_axis(r, idx, 1), axis=1), 1)


def mqar(rng, batch, seq_len, num_kv_pairs=8, num_keys=None, num_values=None, power_a=None,
         random_non_queries=False):
    """Keys are ids [1, 1 + num_keys), values [1 + num_keys, 1 + num_keys + num_values).

    The queries take n of the (seq_len - 2n) // 2 even slots after the pairs: uniformly (power_a
    None), or as Zoology's generator draws them, slot i (from 1) with probability proportional to
    i^(power_a - 1), without replacement (Zoology's default power_a = 0.01 favours the slots
    right after the pairs; 1 is uniform). `random_non_queries`: every token that is neither a
    pair's nor a query's is a random id of the whole vocabulary, 0 included (Zoology's default),
    not the blank 0. Zoology also draws its values without replacement; here they repeat, as a
    row's 16 of 4095 values rarely do."""
    n = num_kv_pairs
    nk, nv = num_keys or 4 * n, num_values or 4 * n
    if seq_len < 4 * n:
        raise ValueError(f"mqar: seq_len={seq_len} must be >= 4 * num_kv_pairs = {4 * n}")
    keys = 1 + _smallest(rng.random((batch, nk)), n, uniform=True)      # distinct per row
    values = 1 + nk + rng.integers(0, nv, (batch, n))
    tokens = np.zeros((batch, seq_len), np.int64)
    targets = np.zeros_like(tokens)
    tokens[:, 0:2 * n:2], tokens[:, 1:2 * n:2] = keys, values
    # Each pair is queried once, in random order, at distinct even offsets after the context.
    slots = (seq_len - 2 * n) // 2
    if power_a is None:
        chosen = _smallest(rng.random((batch, slots)), n, uniform=True)
    else:
        # n draws without replacement with probabilities p = the n largest of log p + Gumbel
        # noise (the same distribution as drawing one at a time and renormalising)
        logp = (power_a - 1.0) * np.log(np.arange(1, slots + 1))
        chosen = _smallest(-(logp + rng.gumbel(size=(batch, slots))), n)
    pos = 2 * n + 2 * np.sort(chosen, axis=1)
    order = np.argsort(rng.random((batch, n)), axis=1)
    rows = np.arange(batch)[:, None]
    tokens[rows, pos] = keys[rows, order]
    targets[rows, pos] = values[rows, order]
    mask = np.zeros(tokens.shape, np.float32)
    mask[rows, pos] = 1.0
    if random_non_queries:
        filler = mask == 0
        filler[:, :2 * n] = False
        tokens[filler] = rng.integers(0, 1 + nk + nv, int(filler.sum()))
    return _batch(tokens, targets, mask)


def parity(rng, batch, seq_len):
    x = rng.integers(0, 2, (batch, seq_len))
    y = np.cumsum(x, axis=1) % 2
    return _batch(1 + x, 1 + y, np.ones(x.shape))


def modular_addition(rng, batch, seq_len, modulus=5):
    x = rng.integers(0, modulus, (batch, seq_len))
    y = np.cumsum(x, axis=1) % modulus
    return _batch(1 + x, 1 + y, np.ones(x.shape))


def _composition_table(n: int) -> np.ndarray:
    """[n!, n!]: [a, b] = the index (in itertools.permutations order) of "apply a, then b",
    (b o a)(i) = b[a[i]]."""
    perms = np.array(list(itertools.permutations(range(n))))
    index = {tuple(p): i for i, p in enumerate(perms)}
    return np.array([[index[tuple(perms[b][perms[a]])] for b in range(len(perms))]
                     for a in range(len(perms))])


_COMPOSE = {3: _composition_table(3), 5: _composition_table(5)}      # S3 (6), S5 (120)


def _group_word(rng, batch, seq_len, compose):
    """Permutations as tokens, their running composition (the newest applied last) as targets."""
    x = rng.integers(0, len(compose), (batch, seq_len))
    y = np.empty_like(x)
    acc = x[:, 0]
    y[:, 0] = acc
    for t in range(1, seq_len):
        acc = compose[acc, x[:, t]]
        y[:, t] = acc
    return _batch(1 + x, 1 + y, np.ones(x.shape))


def s3(rng, batch, seq_len):
    return _group_word(rng, batch, seq_len, _COMPOSE[3])


def s5(rng, batch, seq_len):
    return _group_word(rng, batch, seq_len, _COMPOSE[5])


def icl_regression(rng, batch, seq_len, dim=4):
    """Examples of d + 1 tokens: x as d ids {1: -1, 2: +1}, then y as id 3 + (y + d).

    The target of the last x token of each example is y; only those positions are scored.
    """
    n_ex = seq_len // (dim + 1)
    w = rng.integers(-1, 2, (batch, 1, dim))
    x = 2 * rng.integers(0, 2, (batch, n_ex, dim)) - 1
    y = np.sum(w * x, axis=-1)                                            # [B, n_ex] in [-d, d]
    ex = np.concatenate([(x + 3) // 2, (3 + y + dim)[..., None]], axis=-1)  # [B, n_ex, d + 1]
    tokens = np.zeros((batch, seq_len), np.int64)
    tokens[:, :n_ex * (dim + 1)] = ex.reshape(batch, -1)
    targets = np.zeros_like(tokens)
    mask = np.zeros(tokens.shape, np.float32)
    last_x = np.arange(n_ex) * (dim + 1) + dim - 1
    targets[:, last_x] = 3 + y + dim
    mask[:, last_x] = 1.0
    return _batch(tokens, targets, mask)


def selective_copy(rng, batch, seq_len, num_tokens=8, num_symbols=8):
    """Data ids 1..num_symbols among blanks (0), a separator, then the data again in order."""
    n, sep = num_tokens, num_symbols + 1
    ctx = seq_len - n
    data = 1 + rng.integers(0, num_symbols, (batch, n))
    pos = np.sort(np.argsort(rng.random((batch, ctx - 1)), axis=1)[:, :n], axis=1)
    rows = np.arange(batch)[:, None]
    tokens = np.zeros((batch, seq_len), np.int64)
    tokens[rows, pos] = data
    tokens[:, ctx - 1] = sep
    tokens[:, ctx:] = data                  # teacher forcing: the copy so far is visible
    targets = np.zeros_like(tokens)
    targets[:, ctx - 1:seq_len - 1] = data
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, ctx - 1:seq_len - 1] = 1.0
    return _batch(tokens, targets, mask)


def induction(rng, batch, seq_len, num_symbols=32):
    """A random prefix of length seq_len // 2 then its copy; the copy's next tokens are scored."""
    half = seq_len // 2
    prefix = 1 + rng.integers(0, num_symbols, (batch, half))
    seq = np.concatenate([prefix, prefix, np.zeros((batch, seq_len + 1 - 2 * half), np.int64)], 1)
    tokens, targets = seq[:, :seq_len], seq[:, 1:seq_len + 1]
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, half:2 * half - 1] = 1.0
    return _batch(tokens, targets, mask)


def induction_heads(rng, batch, seq_len, num_symbols=16):
    """Symbols 1..num_symbols, the trigger num_symbols + 1 at a random position and at the end."""
    trigger, rows = num_symbols + 1, np.arange(batch)
    tokens = 1 + rng.integers(0, num_symbols, (batch, seq_len))
    pos = rng.integers(0, seq_len - 2, batch)                 # its answer is never the last token
    tokens[rows, pos], tokens[:, -1] = trigger, trigger
    targets, mask = np.zeros_like(tokens), np.zeros(tokens.shape, np.float32)
    targets[:, -1], mask[:, -1] = tokens[rows, pos + 1], 1.0
    return _batch(tokens, targets, mask)


GENERATORS = {
    "mqar": mqar, "parity": parity, "modular_addition": modular_addition, "s3": s3, "s5": s5,
    "icl_regression": icl_regression, "selective_copy": selective_copy, "induction": induction,
    "induction_heads": induction_heads,
    "modular_arithmetic": formal.modular_arithmetic,
    "modular_arithmetic_brackets": formal.modular_arithmetic_brackets,
    "linear_regression": regression.linear_regression,
}
# Tasks with real-valued tokens [B, T, width] and targets (a regression loss).
REGRESSION = ("linear_regression",)


def vocab_size(name: str, **params) -> int:
    """Token ids a model needs; for a regression task, the width of its real-valued tokens."""
    if name == "linear_regression":
        return params.get("dim", 10) + 1
    if name.startswith("modular_arithmetic"):
        return formal.vocab_size(params.get("modulus", 5))
    if name == "mqar":
        n = params.get("num_kv_pairs", 8)
        return 1 + (params.get("num_keys") or 4 * n) + (params.get("num_values") or 4 * n)
    if name == "icl_regression":
        return 3 + 2 * params.get("dim", 4) + 1
    if name == "selective_copy":
        return params.get("num_symbols", 8) + 2
    if name == "induction":
        return params.get("num_symbols", 32) + 1
    if name == "induction_heads":
        return params.get("num_symbols", 16) + 2
    return 1 + {"parity": 2, "modular_addition": params.get("modulus", 5), "s3": 6,
                "s5": 120}[name]


def num_classes(name: str, **params) -> int | None:
    if name in REGRESSION:
        return None
    if name == "mqar":
        return params.get("num_values") or 4 * params.get("num_kv_pairs", 8)
    if name in ("selective_copy", "induction", "induction_heads"):
        return params.get("num_symbols", {"selective_copy": 8, "induction": 32,
                                          "induction_heads": 16}[name])
    if name == "icl_regression":
        return 2 * params.get("dim", 4) + 1                   # y = w.x in [-d, d]
    if name in ("modular_addition", "modular_arithmetic", "modular_arithmetic_brackets"):
        return params.get("modulus", 5)
    return {"parity": 2, "s3": 6, "s5": 120}[name]
