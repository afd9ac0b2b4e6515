"""In-context linear regression at von Oswald et al. 2023's setup (*Transformers Learn In-Context
by Gradient Descent*): x in R^10 uniform in [-1, 1]^10, w ~ N(0, I), N = 10 examples
and a query per sequence, real-valued tokens (x_i, y_i) read in linearly
(`training/regression.py`), K layers of linear self-attention (identity feature map, no
normaliser, no MLP, no norms: h + LSA(h) per layer), the squared error of y at the query. Its
baselines, reported beside it in `result.json`, are K steps of gradient descent on the same
evaluation tasks with the step sizes fitted on held-out tasks (`baseline.gd`), K steps of the
paper's GD++ fitted there too (`baseline.gdpp`), and predicting 0 (`baseline.zero`). Cells:
`lsa` (K = 1), `lsa-2layers`, `lsa-3layers`, causal as our other models; `lsa-2layers-bidir`,
`lsa-3layers-bidir` as the paper's layers, where every token sees every example (the linear
attention's `prefix` = the N examples; with one layer only the query's output counts, so the
two forms are one model).

    python -m experiments.train --config=experiments/configs/paper_icl_regression.py:lsa
"""

from experiments.configs.base import base_config

LAYERS = {"lsa": 1, "lsa-2layers": 2, "lsa-3layers": 3,
          "lsa-2layers-bidir": 2, "lsa-3layers-bidir": 3}      # cell: K
CELLS = tuple(LAYERS)
N = 10                                                         # in-context examples


def get_config(cell: str = "lsa"):
    if cell not in CELLS:
        raise ValueError(f"paper_icl_regression: cell {cell!r} is not one of {CELLS}")
    c = base_config()
    c.workdir = f"runs/paper_icl_regression/{cell}"
    c.seeds = (0, 1, 2)
    c.task.update(name="linear_regression", seq_len=N + 1, params={"dim": 10})
    c.model.update(d_model=64, num_layers=LAYERS[cell], num_heads=1, norm="none",
                   mixer="linear_attention", ffn="none", dtype="float32", init_std=64 ** -0.5,
                   tie_embeddings=False,
                   mixer_options={"linear_attention": {"feature_map": "identity",
                                                       "normalize": False,
                                                       "output_norm": False,
                                                       **({"prefix": N} if cell.endswith(
                                                           "-bidir") else {})}})
    # at lr 1e-3 (width 32) the layer had not left the loss of predicting 0 after 1500 steps
    c.train.update(steps=5000, batch_size=256, lr=1e-2, warmup_steps=200, weight_decay=0.0,
                   checkpoint_every=0, progress=False, log_every=100)
    c.eval.update(every=1000, batches=8, batch_size=256)
    return c
