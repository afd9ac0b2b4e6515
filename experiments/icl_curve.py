"""In-context linear regression: error against the number of in-context examples, for a trained
model and for least squares on the same prefixes (Garg et al. 2022, "What Can Transformers Learn
In-Context?"; von Oswald et al. 2023, "Transformers learn in-context by gradient descent").

    python -m experiments.icl_curve --workdir=experiments/results/icl_curve   # train, evaluate
    python -m experiments.icl_curve --quick --workdir=/tmp/icl_quick          # CPU smoke test

The task is `configs/icl_regression.py`'s: per sequence a weight w in {-1, 0, 1}^d, examples
x in {-1, 1}^d with y = w.x written as tokens, the model scored on predicting y after x (the run
trains the config, or resumes it, in --workdir). For example k (k earlier examples in context),
three predictors of y_k:

- the model: its most likely y token, and its mean of y under the predicted distribution;
- least squares: the minimum-norm solution w^ = X_k^+ y_k of the k earlier examples, predicting
  x_k . w^ (rounded to the nearest integer for the accuracy);
- Bayes: the posterior predictive over the 3^d weights consistent with the k examples (uniform
  prior), its most likely y; the best any predictor can do on this task.

Writes `icl_curve.json` (accuracy and mean squared error of each predictor per k) and
`icl_curve.png` into --workdir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys

import numpy as np


def least_squares(X, y):
    """x_k . w^ for every k, w^ the min-norm LS fit of examples < k (0 for k = 0); [B, n]."""
    B, n, _ = X.shape
    out = np.zeros((B, n))
    for k in range(1, n):
        for b in range(B):
            out[b, k] = X[b, k] @ (np.linalg.pinv(X[b, :k]) @ y[b, :k])
    return out


def bayes(X, y, dim):
    """The most likely y_k under the posterior over w in {-1, 0, 1}^d given examples < k; [B, n]."""
    W = np.array(list(itertools.product((-1, 0, 1), repeat=dim)))           # [3^d, d]
    pred = np.einsum("bnd,wd->bnw", X, W)                                   # every w's y
    ok = pred == y[:, :, None]                                              # [B, n, 3^d]
    consistent = np.cumprod(np.concatenate([np.ones_like(ok[:, :1]), ok[:, :-1]], 1), axis=1)
    out = np.zeros(y.shape)
    values = np.arange(-dim, dim + 1)
    for i, v in enumerate(values):
        votes = np.sum(consistent * (pred == v), axis=-1)
        if i == 0:
            best, out[:] = votes, v
        else:
            better = votes > best
            best, out = np.where(better, votes, best), np.where(better, v, out)
    return out


def model_predictions(model, tokens, dim):
    """(most likely y, mean y) at every example's last x token; [B, n] each."""
    import jax
    import jax.numpy as jnp

    logits = np.asarray(jax.jit(lambda t: model(t)[0].astype(jnp.float32))(jnp.asarray(tokens)))
    n = tokens.shape[1] // (dim + 1)
    last_x = np.arange(n) * (dim + 1) + dim - 1
    y_ids = 3 + np.arange(2 * dim + 1)                                      # token of y = -d .. d
    lg = logits[:, last_x][..., y_ids]                                      # [B, n, 2d + 1]
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    values = np.arange(-dim, dim + 1)
    return values[np.argmax(lg, -1)], p @ values


def curves(model, dim, seq_len, batches, batch_size, seed):
    from linear_jax.training import synthetic

    rng = np.random.default_rng(seed)
    rows = {"y": [], "model_top": [], "model_mean": [], "ls": [], "bayes": []}
    for _ in range(batches):
        b = synthetic.icl_regression(rng, batch_size, seq_len, dim=dim)
        n = seq_len // (dim + 1)
        ex = b["tokens"][:, :n * (dim + 1)].reshape(batch_size, n, dim + 1)
        X, y = 2 * ex[..., :dim] - 3, ex[..., dim] - 3 - dim
        top, mean = model_predictions(model, b["tokens"], dim)
        rows["y"].append(y)
        rows["model_top"].append(top)
        rows["model_mean"].append(mean)
        rows["ls"].append(least_squares(X.astype(float), y.astype(float)))
        rows["bayes"].append(bayes(X, y, dim))
    r = {k: np.concatenate(v) for k, v in rows.items()}
    y = r["y"]
    acc = lambda pred: np.mean(np.rint(pred) == y, axis=0).tolist()
    mse = lambda pred: np.mean((pred - y) ** 2, axis=0).tolist()
    return {"k": list(range(y.shape[1])), "sequences": int(y.shape[0]),
            "accuracy": {"model": acc(r["model_top"]), "least_squares": acc(r["ls"]),
                         "bayes": acc(r["bayes"])},
            "mse": {"model": mse(r["model_mean"]), "least_squares": mse(r["ls"]),
                    "bayes": mse(r["bayes"])}}


def plot(result, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"model": "model (trained)", "least_squares": "least squares (min-norm)",
              "bayes": "Bayes (posterior over w)"}
    for ax, metric, ylabel in ((axes[0], "accuracy", "accuracy of y_k"),
                               (axes[1], "mse", "mean squared error of y_k")):
        for name, label in labels.items():
            ax.plot(result["k"], result[metric][name], marker=".", label=label)
        ax.axvline(result["dim"], color="gray", ls=":", lw=1)
        ax.set_xlabel("in-context examples k (dotted: k = d)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.icl_curve",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workdir", default="runs/icl_curve")
    p.add_argument("--steps", type=int, help="training steps (default: the config's)")
    p.add_argument("--batches", type=int, default=8, help="evaluation batches")
    p.add_argument("--seed", type=int, default=1234, help="evaluation data seed")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 batch: a smoke test")
    a = p.parse_args(argv)

    from experiments.configs import icl_regression
    from linear_jax.training import loop

    config = icl_regression.get_config()
    config.workdir = a.workdir
    config.train.progress = False
    if a.quick:       # the script end to end, not the learning: two steps (one at lr > 0)
        config.train.update(steps=2, warmup_steps=1, batch_size=8)
        config.eval.update(every=2, batches=1)
        a.batches = 1
    elif a.steps:
        config.train.steps = a.steps
    config.train.checkpoint_every = config.train.steps
    result = loop.train(config)
    model = loop.load_model(config)
    dim = config.task.params["dim"]
    out = curves(model, dim, config.task.seq_len, a.batches, config.eval.batch_size, a.seed)
    out.update(dim=dim, mixer=config.model.mixer, steps=result["step"], params=result["params"])
    workdir = pathlib.Path(a.workdir)
    (workdir / "icl_curve.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, workdir / "icl_curve.png",
         f"in-context regression, d = {dim}: {config.model.mixer}, {out['steps']} steps")
    for k in out["k"]:
        print(f"k={k:>2}  accuracy model {out['accuracy']['model'][k]:.3f}  least squares "
              f"{out['accuracy']['least_squares'][k]:.3f}  Bayes {out['accuracy']['bayes'][k]:.3f}"
              f"   mse model {out['mse']['model'][k]:.3f}  least squares "
              f"{out['mse']['least_squares'][k]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
