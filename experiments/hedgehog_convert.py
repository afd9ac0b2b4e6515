"""Converting a softmax-attention LM to Hedgehog linear attention (Zhang et al. 2024, "The
Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry").

    python -m experiments.hedgehog_convert --workdir=experiments/results/hedgehog_convert
    python -m experiments.hedgehog_convert --quick --workdir=/tmp/hh     # CPU smoke test

1. Teacher: a byte-level softmax-attention LM (`configs/hedgehog_convert.py`, no positional
   encoding) trained on Shakespeare; snapshot at `lm_steps`, then trained on to the end.
2. Attention distillation: the teacher frozen, every attention layer gets Hedgehog feature maps
   phi(x) = softmax([x W + b, -(x W + b)]) on its own queries and keys (W = I, b = 0 at the start),
   and only the maps train, on the teacher's hidden states, to minimise the soft cross-entropy
   -sum_j A_ij log A^lin_ij between each softmax attention row A_i (causal, within its document)
   and the linear attention row A^lin_ij = phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j').
3. The converted model (the teacher's weights, Hedgehog layers with the learned maps) is
   fine-tuned end to end on the language-modelling loss.
4. The same Hedgehog LM trained from scratch for as many language-modelling steps.

Writes `hedgehog_convert.json` (eval loss curves of the three models; attention KL per converted
layer on the teacher's hidden states with the identity maps, after distillation and after
fine-tuning; the distillation curve) and `hedgehog_convert.png` into --workdir.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from linear_jax.layers.common import heads
from linear_jax.models import LM, LMConfig
from linear_jax.ops.feature_maps import hedgehog_features
from linear_jax.training.data import make_source
from linear_jax.training.text import VOCAB_SIZE

FEATURES = ("wq", "bq", "wk", "bk")


def lm_config(c, mixer: str) -> LMConfig:
    opts = {"attention": {"rope_theta": None}} if mixer == "attention" else {}
    return LMConfig(vocab_size=VOCAB_SIZE, mixer=mixer, mixer_options=opts, **c.model)


def lm_loss(model, batch):
    logits, _, _ = model(batch["tokens"], segment_ids=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return (ce * batch["mask"]).sum() / batch["mask"].sum()


def schedule(lr, warmup, steps):
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.1)


class Trainer:
    """Adam on every parameter of `model`, one jitted step; evaluation on fixed batches."""

    def __init__(self, model, lr, warmup, steps):
        self.model = model
        self.opt = nnx.Optimizer(model, optax.adamw(schedule(lr, warmup, steps),
                                                    weight_decay=0.01), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, batch):
            loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
            opt.update(model, grads)
            return loss

        self.step = lambda batch: step(self.model, self.opt, batch)


@nnx.jit
def eval_loss(model, batch):
    return lm_loss(model, batch)


def evaluate(model, batches) -> float:
    return float(np.mean([eval_loss(model, b) for b in batches]))


def train_lm(model, source, evals, c, start: int, steps: int, lr_steps: int, curve: list,
             every: int, snapshot_at=None):
    """Trains `steps` steps from data position `start`; appends (step, eval loss) to `curve`.
    Returns the model state at `snapshot_at` (a step count), if given."""
    tr = Trainer(model, c.lr, c.warmup_steps, lr_steps)
    snap = None
    for i in range(steps):
        if snapshot_at is not None and i == snapshot_at:
            snap = nnx.state(model)
            snap = jax.tree.map(jnp.copy, snap)
        tr.step({k: jnp.asarray(v) for k, v in source.batch(start + i).items()})
        if (i + 1) % every == 0 or i + 1 == steps:
            curve.append((start + i + 1, evaluate(model, evals)))
    return snap


def layer_inputs(model, tokens, seg):
    """The input of every layer's attention (its pre-norm output), in the teacher's forward."""
    h = jnp.take(model.embed[...], tokens, axis=0)
    xs = []
    for block in layers(model):
        xs.append(block.norm1(h))
        h = block(h, segment_ids=seg)[0]
    return xs


def attention_rows(x, wq, wk, H, seg, fmap):
    """log softmax-attention rows and log Hedgehog rows [B, H, T, T] of one layer, and the mask."""
    q, k = heads(x @ wq, H), heads(x @ wk, H)
    T = x.shape[1]
    mask = jnp.tril(jnp.ones((T, T), bool)) & (seg[:, :, None] == seg[:, None, :])
    mask = mask[:, None]
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    log_soft = jax.nn.log_softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    fq, fk = hedgehog_features(q, fmap["wq"], fmap["bq"]), hedgehog_features(k, fmap["wk"],
                                                                             fmap["bk"])
    s = jnp.where(mask, jnp.einsum("bihf,bjhf->bhij", fq, fk), 0.0)
    log_lin = jnp.log(jnp.maximum(s, 1e-30)) - jnp.log(s.sum(-1, keepdims=True))
    return log_soft, log_lin, mask


def distill_losses(fmaps, proj, xs, seg, H):
    """Per layer (soft cross-entropy, KL) averaged over rows, on the teacher's hidden states."""
    out = []
    for fmap, (wq, wk), x in zip(fmaps, proj, xs, strict=True):
        log_soft, log_lin, mask = attention_rows(x, wq, wk, H, seg, fmap)
        p = jnp.where(mask, jnp.exp(log_soft), 0.0)
        ce = -jnp.sum(jnp.where(mask, p * log_lin, 0.0), -1).mean()
        ent = -jnp.sum(jnp.where(mask, p * log_soft, 0.0), -1).mean()
        out.append((ce, ce - ent))
    return out


def layers(model):
    """The model's layers one by one, each a `Block` of its own (sliced out of the stacked
    layers: read them, do not train them)."""
    return [model.layer(i) for i in range(model.config.num_layers)]


def projections(model):
    return [(b.mixer.q_proj.kernel[...], b.mixer.k_proj.kernel[...]) for b in layers(model)]


def feature_maps(model):
    return [{n: getattr(b.mixer, n)[...] for n in FEATURES} for b in layers(model)]


def distill(teacher, fmaps, source, c, steps, H):
    """Trains the feature maps alone (soft cross-entropy); returns them and the mean attention
    KL over layers at every step."""
    tx = optax.adam(schedule(c.distill_lr, c.warmup_steps, steps))
    state = tx.init(fmaps)
    proj = projections(teacher)

    @jax.jit
    def step(fmaps, state, xs, seg):
        def loss(f):
            per = distill_losses(f, proj, xs, seg, H)
            return sum(ce for ce, _ in per) / len(xs), sum(kl for _, kl in per) / len(xs)

        (_, kl), g = jax.value_and_grad(loss, has_aux=True)(fmaps)
        upd, state = tx.update(g, state, fmaps)
        return optax.apply_updates(fmaps, upd), state, kl

    hidden = nnx.jit(layer_inputs)
    curve = []
    for i in range(steps):
        b = source.batch(i)
        seg = jnp.asarray(b["segment_ids"])
        xs = hidden(teacher, jnp.asarray(b["tokens"]), seg)
        fmaps, state, val = step(fmaps, state, xs, seg)
        curve.append(float(val))
    return fmaps, curve


def attention_kl(teacher, fmaps, batches, H, proj=None):
    """Mean KL(softmax row || Hedgehog row) per layer over `batches`, on the teacher's states;
    `proj`: the query/key projections to use (default the teacher's)."""
    proj = projections(teacher) if proj is None else proj
    f = jax.jit(lambda fm, xs, seg: [kl for _, kl in distill_losses(fm, proj, xs, seg, H)])
    hidden = nnx.jit(layer_inputs)
    per = [f(fmaps, hidden(teacher, b["tokens"], b["segment_ids"]), b["segment_ids"])
           for b in batches]
    return [float(np.mean([p[layer] for p in per])) for layer in range(len(fmaps))]


def convert(teacher_state, student, fmaps):
    """The student with the teacher's weights (same paths and shapes) and the learned maps."""
    gdef, state = nnx.split(student)
    sd, td = nnx.to_pure_dict(state), nnx.to_pure_dict(teacher_state)

    def copy(dst, src):
        for key, val in dst.items():
            if key in src and isinstance(val, dict):
                copy(val, src[key])
            elif key in src and np.shape(val) == np.shape(src[key]):
                dst[key] = src[key]
    copy(sd, td)
    first = 0               # the maps of layer first + j * period + k: index j of block k's stack
    for n, stack in enumerate(student.stacks):
        period = len(stack.blocks)
        for k in range(period):
            mixer = sd["stacks"][n]["blocks"][k]["mixer"]
            for name in fmaps[first + k]:
                mixer[name] = jnp.stack([fmaps[first + j * period + k][name]
                                         for j in range(stack.repeats)])
        first += stack.num_layers
    nnx.replace_by_pure_dict(state, sd)
    return nnx.merge(gdef, state)


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in out["eval_loss"].items():
        a.plot(*zip(*curve, strict=True), marker=".", label=name)
    a.axvline(out["lm_steps"], color="gray", lw=0.8, ls=":")
    later = [v for curve in out["eval_loss"].values() for step, v in curve if step > 0]
    if later:                   # the untrained loss at step 0 would flatten everything else
        a.set_ylim(min(later) - 0.02, max(later) + 0.02)
    a.set(xlabel="language-modelling steps", ylabel="eval loss (nats / byte)",
          title=f"{out['corpus']}: eval loss")
    a.legend()
    b.plot(out["distill_kl"])
    b.set(xlabel="distillation step", ylabel="attention KL (mean over layers)",
          title="attention-weight distillation", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.hedgehog_convert",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workdir", default="runs/hedgehog_convert")
    p.add_argument("--quick", action="store_true", help="a few steps of each phase: smoke test")
    a = p.parse_args(argv)
    from experiments.configs import hedgehog_convert

    c = hedgehog_convert.get_config()
    if a.quick:
        c.update(lm_steps=4, distill_steps=3, finetune_steps=2, eval_every=2, eval_batches=1,
                 batch_size=4, warmup_steps=1)
        c.task.seq_len = 32
        c.model.update(d_model=32, num_layers=1)
    t0 = time.time()
    src = lambda split, seed: make_source(c.task, split=split, batch_size=c.batch_size,
                                          seed=seed)
    train, evals_src = src("train", c.seed), src("eval", 0)
    evals = [{k: jnp.asarray(v) for k, v in evals_src.batch(i).items()}
             for i in range(c.eval_batches)]
    H, total = c.model.num_heads, c.lm_steps + c.finetune_steps
    curves = {"teacher (softmax)": [], "converted (Hedgehog)": [], "scratch (Hedgehog)": []}

    teacher = LM(lm_config(c, "attention"), rngs=nnx.Rngs(c.seed))
    curves["teacher (softmax)"].append((0, evaluate(teacher, evals)))
    snap = train_lm(teacher, train, evals, c, 0, total, total, curves["teacher (softmax)"],
                    c.eval_every, snapshot_at=c.lm_steps)
    gdef = nnx.graphdef(teacher)
    at_conversion = nnx.merge(gdef, snap)
    teacher_eval = [(s, v) for s, v in curves["teacher (softmax)"] if s == c.lm_steps]

    student = LM(lm_config(c, "hedgehog"), rngs=nnx.Rngs(c.seed + 1))
    fmaps0 = feature_maps(student)
    kl = {"identity maps": attention_kl(at_conversion, fmaps0, evals, H)}
    fmaps, distill_curve = distill(at_conversion, fmaps0, train, c, c.distill_steps, H)
    kl["distilled"] = attention_kl(at_conversion, fmaps, evals, H)
    converted = convert(snap, student, fmaps)
    conv_curve = curves["converted (Hedgehog)"]
    conv_curve.append((c.lm_steps, evaluate(converted, evals)))
    train_lm(converted, train, evals, c, c.lm_steps, c.finetune_steps, c.finetune_steps,
             conv_curve, c.eval_every)
    kl["fine-tuned"] = attention_kl(at_conversion, feature_maps(converted), evals, H,
                                    proj=projections(converted))

    scratch = LM(lm_config(c, "hedgehog"), rngs=nnx.Rngs(c.seed + 2))
    curves["scratch (Hedgehog)"].append((0, evaluate(scratch, evals)))
    train_lm(scratch, train, evals, c, 0, total, total, curves["scratch (Hedgehog)"],
             c.eval_every)

    out = {"corpus": train.corpus, "lm_steps": c.lm_steps, "distill_steps": c.distill_steps,
           "finetune_steps": c.finetune_steps, "config": c.to_dict(),
           "eval_loss": curves,
           "final_eval_loss": {n: v[-1][1] for n, v in curves.items()},
           "teacher_at_conversion": teacher_eval[0][1] if teacher_eval else None,
           "converted_before_finetune": conv_curve[0][1],
           "attention_kl_per_layer": kl, "distill_kl": distill_curve,
           "seconds": round(time.time() - t0, 1)}
    workdir = pathlib.Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "hedgehog_convert.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, workdir / "hedgehog_convert.png")
    for name, v in out["final_eval_loss"].items():
        print(f"{name:>22}: eval loss {v:.4f}")
    print(f"converted before fine-tuning: {out['converted_before_finetune']:.4f}; attention KL "
          f"per layer: {kl}; {out['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
