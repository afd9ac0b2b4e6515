"""experiments/icl_curve.py: its least-squares and Bayes baselines on hand-made examples, and the
script end to end at its smoke-test size."""

import json

import numpy as np
import pytest

from experiments import icl_curve


def test_baselines_recover_w_once_the_examples_pin_it():
    rng = np.random.default_rng(0)
    d, n = 4, 12
    w = np.array([[1, 0, -1, 1]])
    X = 2 * rng.integers(0, 2, (1, n, d)) - 1
    y = np.einsum("bnd,bd->bn", X, w)
    ls, by = icl_curve.least_squares(X.astype(float), y.astype(float)), icl_curve.bayes(X, y, d)
    assert ls[0, 0] == 0.0                                    # nothing seen: predicts 0
    rank = [np.linalg.matrix_rank(X[0, :k]) if k else 0 for k in range(n)]
    for k in range(n):
        if rank[k] == d:                                      # X_k spans R^d: both are exact
            assert abs(ls[0, k] - y[0, k]) < 1e-9 and by[0, k] == y[0, k]
    # with no examples, Bayes predicts the prior's mode of w.x (0 for d = 4, all w equally likely)
    assert by[0, 0] == 0


@pytest.mark.smoke
def test_script_quick(tmp_path):
    assert icl_curve.main(["--quick", f"--workdir={tmp_path}"]) == 0
    out = json.loads((tmp_path / "icl_curve.json").read_text())
    assert set(out["accuracy"]) == {"model", "least_squares", "bayes"}
    assert len(out["mse"]["model"]) == len(out["k"]) == 24
    assert out["accuracy"]["bayes"][-1] >= out["accuracy"]["least_squares"][0]
    assert (tmp_path / "icl_curve.png").exists()
