"""Modular arithmetic expressions, the label at the last token (Deletang et al. 2023, *Neural
Networks and the Chomsky Hierarchy*, the tasks Grazzi et al. 2025 and xLSTM take over).

- modular_arithmetic: `n0 op n1 op ... nk` with n in {0..m-1}, op in {+, -, *} and the usual
  precedence (products first); the answer is its value mod m. A regular language: a finite
  automaton over (running sum, sign, current product) reads it left to right.
- modular_arithmetic_brackets: fully bracketed expressions over {+, -} (Deletang's default, no
  products) drawn by its recursive grammar at an exact length, e.g. `((1-(-3))+(4))`; a
  deterministic context-free language (the brackets need a stack).

Token ids: 0 padding, 1 + n for the digit n, then `+ - * ( )`. Only the last token is scored; its
target is 1 + the value. Expressions without brackets have odd length: an even `seq_len` gives
one of `seq_len - 1` tokens (`data.SyntheticSource` pads the rows back to `seq_len`).
"""

from __future__ import annotations

import numpy as np

OPS = "+-*()"


def op_id(modulus: int, op: str) -> int:
    return 1 + modulus + OPS.index(op)


def vocab_size(modulus: int) -> int:
    return 1 + modulus + len(OPS)


def _last_only(tokens, value, modulus):
    B, T = tokens.shape
    targets, mask = np.zeros((B, T), np.int32), np.zeros((B, T), np.float32)
    targets[:, -1], mask[:, -1] = 1 + value % modulus, 1.0
    return {"tokens": tokens.astype(np.int32), "targets": targets, "mask": mask}


def modular_arithmetic(rng, batch, seq_len, modulus=5):
    n_ops = (seq_len - 1) // 2
    nums = rng.integers(0, modulus, (batch, n_ops + 1))
    ops = rng.integers(0, 3, (batch, n_ops))                         # + - *
    total, sign, term = np.zeros(batch, np.int64), np.ones(batch, np.int64), nums[:, 0]
    for i in range(n_ops):
        mul, v = ops[:, i] == 2, nums[:, i + 1]
        total = np.where(mul, total, total + sign * term)            # a + or - closes a term
        sign = np.where(mul, sign, np.where(ops[:, i] == 0, 1, -1))
        term = np.where(mul, term * v % modulus, v)
    tokens = np.zeros((batch, 2 * n_ops + 1), np.int64)
    tokens[:, 0::2] = 1 + nums
    tokens[:, 1::2] = 1 + modulus + ops
    return _last_only(tokens, total + sign * term, modulus)


def _bracketed(rng, length: int, modulus: int) -> tuple[list[str], int]:
    """An expression of exactly `length` symbols and its value (Deletang's grammar, + and -)."""
    d = int(rng.integers(0, modulus))
    small = {1: ([str(d)], d), 2: (["-", str(d)], -d), 3: (["(", str(d), ")"], d),
             4: (["(", "-", str(d), ")"], -d)}
    if length in small:
        return small[length]
    left = int(rng.integers(1, length - 3))
    ls, lv = _bracketed(rng, left, modulus)
    rs, rv = _bracketed(rng, length - left - 3, modulus)
    op = "+-"[int(rng.integers(0, 2))]
    return ["(", *ls, op, *rs, ")"], lv + rv if op == "+" else lv - rv


def modular_arithmetic_brackets(rng, batch, seq_len, modulus=5):
    tokens, values = np.zeros((batch, seq_len), np.int64), np.zeros(batch, np.int64)
    for b in range(batch):
        symbols, values[b] = _bracketed(rng, seq_len, modulus)
        tokens[b] = [1 + int(s) if s.isdigit() else op_id(modulus, s) for s in symbols]
    return _last_only(tokens, values, modulus)
