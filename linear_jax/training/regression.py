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

GD++, the paper's account of what deeper trained models do, adds to each layer's step on the
targets a step on the inputs, x_j <- (I - gamma_k (1/N) sum_i x_i x_i^T) x_j for every token,
the query's included (a curvature correction: it shrinks the spread of A's eigenvalues). Both
come from the same layer's tokens; with the inputs at P_k x (P_1 = I, all P_k polynomials in A,
so symmetric and commuting with it) the layer is a preconditioned GD step in the original
coordinates,

    w_{k+1} = w_k - eta_k P_k^2 (A w_k - b),    P_{k+1} = (I - gamma_k P_k A P_k) P_k,

and y_hat = w_K . x_q as before; gamma_K acts after the last step, so K - 1 of them count.
`baselines` fits (eta, gamma) on the same held-out tasks, from GD's step sizes and gamma = 0, so
on those tasks GD++ is at least as good as GD; for K = 1 the two are the same predictor.
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


def gdpp_predict(step_sizes, gammas, A, b, x_q) -> np.ndarray:
    """y_hat of len(step_sizes) GD++ steps from w = 0 (the module docstring), per query;
    `gammas` holds one input step per GD step but the last (zeros: `gd_predict`)."""
    if len(gammas) != len(step_sizes) - 1:
        raise ValueError(f"gdpp_predict: {len(step_sizes)} steps need {len(step_sizes) - 1} "
                         f"gammas, got {len(gammas)}")
    w, P = np.zeros_like(b), np.broadcast_to(np.eye(b.shape[-1]), A.shape)
    for k, eta in enumerate(step_sizes):
        P2 = P @ P
        w = w - eta * np.einsum("mij,mj->mi", P2, np.einsum("mij,mj->mi", A, w) - b)
        if k < len(gammas):
            P = P - gammas[k] * (P @ A @ P2)
    return np.einsum("mi,mi->m", w, x_q)


def fit_gdpp(A, b, x_q, y_q, step_sizes) -> tuple[np.ndarray, np.ndarray]:
    """(eta, gamma) of GD++ that minimise the mean squared error on these tasks, from GD's
    `step_sizes` and gamma = 0 (BFGS; the loss is a polynomial in a handful of scalars)."""
    import scipy.optimize

    K = len(step_sizes)
    loss = lambda z: float(np.mean((gdpp_predict(z[:K], z[K:], A, b, x_q) - y_q) ** 2))
    z0 = np.concatenate([np.asarray(step_sizes, np.float64), np.zeros(K - 1)])
    z = scipy.optimize.minimize(loss, z0, method="BFGS", options={"gtol": 1e-10}).x
    z = z if loss(z) <= loss(z0) else z0
    return z[:K], z[K:]


def baselines(tune_batches, eval_batches, steps: int = 1) -> dict:
    """The reference predictors scored on `eval_batches` (lists of batches), each loss the mean
    squared error, as the model's eval loss: `gd`, `steps` steps of GD with their step sizes
    fitted on `tune_batches` ({"steps", "step_sizes", "loss"}), `gdpp`, `steps` steps of GD++
    fitted there too ({"steps", "step_sizes", "gammas", "loss"}), and `zero`, predicting y = 0
    ({"loss"}: the loss before any learning)."""
    tune = _tasks(tune_batches)
    etas = fit_step_sizes(*tune, steps)
    pp_etas, gammas = fit_gdpp(*tune, etas)
    A, b, x_q, y_q = _tasks(eval_batches)
    mse = lambda pred: float(np.mean((pred - y_q) ** 2))
    return {"gd": {"steps": steps, "step_sizes": [float(e) for e in etas],
                   "loss": mse(gd_predict(etas, A, b, x_q))},
            "gdpp": {"steps": steps, "step_sizes": [float(e) for e in pp_etas],
                     "gammas": [float(g) for g in gammas],
                     "loss": mse(gdpp_predict(pp_etas, gammas, A, b, x_q))},
            "zero": {"loss": float(np.mean(y_q ** 2))}}
