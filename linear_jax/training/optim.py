"""The optimiser: global-norm clipping, then AdamW on a linear-warmup cosine schedule.

Weight decay applies to matrices only (ndim >= 2), not to norm scales, biases or gate offsets.
Gradient accumulation is not an optax wrapper here: the train step scans over microbatches
(`step.py`), which keeps one optimiser update per step and the exact full-batch gradient.
"""

from __future__ import annotations

import jax
import optax


def schedule(train) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.lr * train.min_lr_ratio)


def make_optimizer(train) -> optax.GradientTransformation:
    """From the `train` part of a config: lr, warmup_steps, steps, min_lr_ratio, b1, b2,
    weight_decay, clip_norm (0 disables clipping)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule(train), b1=train.b1, b2=train.b2, eps=1e-8,
                        weight_decay=train.weight_decay, mask=decay_mask)
    if train.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.clip_norm), adamw)
    return adamw
