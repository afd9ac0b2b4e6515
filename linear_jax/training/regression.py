"""In-context linear regression with real-valued tokens, and its one-step gradient-descent baseline
(von Oswald et al. 2023, *Transformers Learn In-Context by Gradient Descent*).

A sequence is one task: w ~ N(0, I_d), x_i ~ U(-1, 1)^d, y_i = w . x_i. Its tokens are the N
examples e_i = (x_i, y_i) and the query (x_q, 0), so `seq_len` = N + 1 and every token is a real
vector of width d + 1. The model reads them through a linear read-in (`LM` with float inputs: the
embedding table as a matrix) and predicts y_q at the query from its output's last coordinate, the
y entry of the token space; the loss is the squared error there (`step._sums`).

One step of gradient descent from w = 0 on L(w) = 1/(2N) sum_i (w . x_i - y_i)^2 predicts
y_hat = eta a, a = (1/N) sum_i y_i x_i . x_q: the prediction the paper's construction of one
linear self-attention layer reproduces. `gd_baseline` tunes eta on held-out tasks (its optimum is
closed form, sum a y / sum a^2) and scores it on the evaluation tasks.
"""

from __future__ import annotations

import numpy as np


def linear_regression(rng, batch, seq_len, dim=10):
    n = seq_len - 1
    w = rng.standard_normal((batch, dim))
    x = rng.uniform(-1.0, 1.0, (batch, seq_len, dim))
    y = np.einsum("btd,bd->bt", x, w)
    tokens = np.concatenate([x, y[..., None]], axis=-1)
    tokens[:, n, dim] = 0.0                                     # the query's y is hidden
    targets, mask = np.zeros((batch, seq_len), np.float32), np.zeros((batch, seq_len), np.float32)
    targets[:, n], mask[:, n] = y[:, n], 1.0
    return {"tokens": tokens.astype(np.float32), "targets": targets, "mask": mask}


def _gd_feature(batch) -> tuple[np.ndarray, np.ndarray]:
    """(a, y_q) of every scored query: a = (1/N) sum_i y_i x_i . x_q over the examples before it."""
    tokens, mask = np.asarray(batch["tokens"], np.float64), np.asarray(batch["mask"])
    rows, q = np.nonzero(mask)
    x, y = tokens[..., :-1], tokens[..., -1]
    a = np.array([np.mean(y[b, :t] * (x[b, :t] @ x[b, t])) for b, t in zip(rows, q, strict=True)])
    return a, np.asarray(batch["targets"], np.float64)[rows, q]


def gd_baseline(tune_batches, eval_batches) -> dict:
    """One step of GD with its step size fitted on `tune_batches`, scored on `eval_batches`
    (lists of batches): {"step_size", "loss"} (mean squared error, as the model's eval loss)."""
    a, y = map(np.concatenate, zip(*map(_gd_feature, tune_batches), strict=True))
    eta = float(np.sum(a * y) / np.sum(a * a))
    a, y = map(np.concatenate, zip(*map(_gd_feature, eval_batches), strict=True))
    return {"step_size": eta, "loss": float(np.mean((eta * a - y) ** 2))}
