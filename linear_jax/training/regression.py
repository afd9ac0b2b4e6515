"""In-context linear regression with real-valued tokens, and its gradient-descent baseline
(von Oswald et al. 2023, *Transformers Learn In-Context by Gradient Descent*).

A sequence is one task: w ~ N(0, I_d), x_i ~ U(-1, 1)^d, y_i = w . x_i. Its tokens are the N
examples e_i = (x_i, y_i) and the query (x_q, 0), so `seq_len` = N + 1 and every token is a real
vector of width d + 1. The model reads them through a linear read-in (`LM` with float inputs: the
embedding table as a matrix) and predicts y_q at the query from its output's last coordinate, the
y entry of the token space; the loss is the squared error there (`step._sums`).

K steps of gradient descent from w_0 = 0 on L(w) = 1/(2N) sum_i (w . x_i - y_i)^2,

    w_{k+1} = w_k - eta_k (A w_k - b),    A = (1/N) X^T X,  b = (1/N) X^T y,    y_hat = w_K . x_q,

are what the paper's construction of K linear self-attention layers computes (K = 1: y_hat =
eta_1 b . x_q). `baselines` fits the step sizes eta_1..eta_K on held-out tasks and scores them
on the evaluation tasks. y_hat is affine in each eta_k when the others are held, so the fit is
exact coordinate descent (closed form per coordinate; for K = 1 the least-squares optimum).
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


def _tasks(batches) -> tuple[np.ndarray, ...]:
    """(A [M, d, d], b [M, d], x_q [M, d], y_q [M]) of every scored query in `batches`, from the
    examples before it (float64)."""
    out = []
    for batch in batches:
        tokens, mask = np.asarray(batch["tokens"], np.float64), np.asarray(batch["mask"])
        x, y = tokens[..., :-1], tokens[..., -1]
        targets = np.asarray(batch["targets"], np.float64)
        for r, t in zip(*np.nonzero(mask), strict=True):
            X, Y = x[r, :t], y[r, :t]
            out.append((X.T @ X / t, X.T @ Y / t, x[r, t], targets[r, t]))
    return tuple(np.stack(z) for z in zip(*out, strict=True))


def gd_predict(step_sizes, A, b, x_q) -> np.ndarray:
    """y_hat of len(step_sizes) steps of GD from w = 0 (the module docstring), per query."""
    w = np.zeros_like(b)
    for eta in step_sizes:
        w = w - eta * (np.einsum("mij,mj->mi", A, w) - b)
    return np.einsum("mi,mi->m", w, x_q)


def fit_step_sizes(A, b, x_q, y_q, steps: int, *, sweeps: int = 200, tol: float = 1e-12):
    """The step sizes of `steps` GD steps that minimise the mean squared error on these tasks:
    coordinate descent, each coordinate's minimum in closed form (y_hat is affine in it)."""
    etas = np.zeros(steps)
    for _ in range(sweeps):
        before = etas.copy()
        for k in range(steps):
            etas[k] = 0.0
            p0 = gd_predict(etas, A, b, x_q)
            etas[k] = 1.0
            slope = gd_predict(etas, A, b, x_q) - p0
            etas[k] = np.sum(slope * (y_q - p0)) / np.sum(slope * slope)
        if np.max(np.abs(etas - before)) <= tol * max(1.0, np.max(np.abs(etas))):
            break
    return etas


def baselines(tune_batches, eval_batches, steps: int = 1) -> dict:
    """The reference predictors scored on `eval_batches` (lists of batches), each loss the mean
    squared error, as the model's eval loss: `gd`, `steps` steps of GD with their step sizes
    fitted on `tune_batches` ({"steps", "step_sizes", "loss"}), and `zero`, predicting y = 0
    ({"loss"}: the loss before any learning)."""
    etas = fit_step_sizes(*_tasks(tune_batches), steps)
    A, b, x_q, y_q = _tasks(eval_batches)
    return {"gd": {"steps": steps, "step_sizes": [float(e) for e in etas],
                   "loss": float(np.mean((gd_predict(etas, A, b, x_q) - y_q) ** 2))},
            "zero": {"loss": float(np.mean(y_q ** 2))}}
