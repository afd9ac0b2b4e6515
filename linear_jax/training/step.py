"""Train state, its sharded initialisation, and the train and eval steps.

The state is a dict `{"step", "params", "opt_state", "rest"}`: the model's `nnx.Param`s, the optax
state, and any other model state (`rest`); an optional `lr_scale` multiplies every update (one
member of a vmapped learning-rate sweep, `linear_jax.training.seeds.train_sweep`). The model's graph
is static and lives outside. Mixed precision is the model's: `LMConfig(dtype="bfloat16",
param_dtype="float32")` computes in bfloat16 from float32 master weights, so gradients and updates
are float32; logits and the loss are float32.

Batches are dicts `tokens`, `targets`, `mask` (float weights of the scored positions) and optional
`segment_ids` and `positions` (the scored positions, [B, P], with `targets` and `mask` [B, P] at
them: `linear_jax.training.data.gather_scored`); the loss is the masked mean cross-entropy over the
whole global batch, so a step with k microbatches computes exactly the gradient of a step with one.
Float targets mean a regression task (`linear_jax.training.regression`): the loss is the squared
error of the output's last coordinate, and no accuracy is reported.

Sequence parallelism: with `seq_parallel=SeqParallel(mesh)` (`linear_jax.parallel`) the steps hand
it to the model, whose mixers then run their time-mixing ops split along T over the mesh axis
`seq`. The batch is laid out `P(("data", "fsdp"), "seq")` (`sharding.batch_sharding`), so every
activation keeps its T axis on `seq`; parameters are replicated along it. Loss and gradients are
those of the unsharded step (tests/parallel/test_model.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

State = dict[str, Any]


def init_fn(make_model, tx):
    """() -> (graphdef, state): builds the model on the host, annotations kept, nothing placed."""

    def init():
        with nnx.use_eager_sharding(False):
            model = make_model()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, {"step": jnp.zeros((), jnp.int32), "params": params,
                          "opt_state": tx.init(params), "rest": rest}

    return init


def is_regression(batch) -> bool:
    return jnp.issubdtype(batch["targets"].dtype, jnp.floating)


def _sums(graphdef, params, rest, batch, aux_weight, seq_parallel=None):
    """Summed (not averaged) loss terms of one (micro)batch, and the model's updated rest."""
    model = nnx.merge(graphdef, params, rest)
    sp = {} if seq_parallel is None else {"seq_parallel": seq_parallel}
    if "positions" in batch:                    # the head on the scored positions only
        sp["positions"] = batch["positions"]
    out = model(batch["tokens"], segment_ids=batch.get("segment_ids"), **sp)
    logits = out[0].astype(jnp.float32)
    mask, targets = batch["mask"], batch["targets"]
    if is_regression(batch):
        sums = {"loss": jnp.sum((logits[..., -1] - targets) ** 2 * mask),
                "correct": jnp.zeros(()), "weight": jnp.sum(mask)}
    else:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        sums = {"loss": jnp.sum(ce * mask),
                "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * mask),
                "weight": jnp.sum(mask)}
    # An auxiliary loss (e.g. MoE load balancing) is a per-batch mean: weight it by tokens.
    sums["aux"] = (jnp.asarray(out[2], jnp.float32) * jnp.sum(mask)
                   if len(out) > 2 and out[2] is not None else jnp.zeros(()))
    objective = sums["loss"] + aux_weight * sums["aux"]
    return objective, (sums, nnx.state(model, nnx.Not(nnx.Param)))


def make_train_step(graphdef, tx, *, microbatches: int = 1, aux_weight: float = 0.0,
                    lr_schedule=None, seq_parallel=None):
    """(state, batch) -> (state, metrics); batch rows split into `microbatches` scanned slices;
    `seq_parallel`: a `linear_jax.parallel.SeqParallel` handed to the model (or None)."""

    def train_step(state: State, batch) -> tuple[State, dict]:
        total = jnp.maximum(jnp.sum(batch["mask"]), 1.0)

        def scaled(params, rest, b):
            obj, aux = _sums(graphdef, params, rest, b, aux_weight, seq_parallel)
            return obj / total, aux

        grad_fn = jax.grad(scaled, has_aux=True)

        def micro(carry, b):
            grads, rest, acc = carry
            g, (sums, rest) = grad_fn(state["params"], rest, b)
            return (jax.tree.map(jnp.add, grads, g), rest, jax.tree.map(jnp.add, acc, sums)), None

        # microbatch i = rows i, i + k, i + 2k, ...: a device's rows stay on that device
        split = jax.tree.map(lambda x: jnp.swapaxes(
            x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1), batch)
        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        acc0 = {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "weight", "aux")}
        (grads, rest, acc), _ = jax.lax.scan(micro, (zeros, state["rest"], acc0), split)

        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        if "lr_scale" in state:        # a learning-rate sweep's member: AdamW is linear in lr
            updates = jax.tree.map(lambda u: u * state["lr_scale"].astype(u.dtype), updates)
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": acc["loss"] / total, "accuracy": acc["correct"] / total,
                   "aux_loss": acc["aux"] / total, "grad_norm": optax.tree.norm(grads),
                   "tokens": acc["weight"]}
        if is_regression(batch):
            del metrics["accuracy"]
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"]) * state.get("lr_scale", 1.0)
        new = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state,
               "rest": rest}
        return new, metrics

    return train_step


def make_eval_step(graphdef, seq_parallel=None):
    """(state, batch) -> summed loss / correct / weight; the caller divides after summing."""

    def eval_step(state: State, batch) -> dict:
        _, (sums, _) = _sums(graphdef, state["params"], state["rest"], batch, 0.0, seq_parallel)
        return sums

    return eval_step
