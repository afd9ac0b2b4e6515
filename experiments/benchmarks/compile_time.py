"""Compile time of the language model's train step, per mixer family: lowering and XLA compile
seconds, nothing executed.

    python -m experiments.benchmarks.compile_time [--mixers attention gla ...] [--layers 12]
        [--d_model 1024] [--heads 8] [--seq_len 2048] [--batch 2] [--unrolled [MIXER ...]]
        [--quick]

The train step is the harness's (`linear_jax.training.step.make_train_step`: forward, backward,
AdamW with clipping) on the model of `experiments/configs/lm_shakespeare.py` at the issue's size
(12 layers, d_model 1024, 8 heads, T = 2048, bfloat16 compute, packed documents), lowered from
abstract arrays and compiled for the default device. The batch is small: compile time hardly
depends on it. `hlo_ops` counts the ops of the lowered StableHLO module. `--unrolled` also
measures each model's `unstacked()` form (every layer in a stack of its own: the program a
model without the layer scan compiles), the baseline the scan is measured against (for the
mixers named, or every mixer). Writes
benchmarks/results/compile_time_<platform>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks import common
from experiments.configs import lm_shakespeare
from linear_jax.models import LM
from linear_jax.training import loop, optim, step

# one mixer per family of recurrence, and a hybrid
MIXERS = ("attention", "linear_attention", "retnet", "gla", "deltanet", "gated_deltanet",
          "delta_product", "mamba", "mamba2", "hgrn", "mlstm", "gla+attention")


def model_config(mixer: str, a):
    c = lm_shakespeare.get_config()
    name, _, every = mixer.partition("+")
    c.model.update(mixer=name, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                   attn_every=4 if every else 0)
    return loop.lm_config(c.model, 256), optim.make_optimizer(c.train)


def measure(mixer: str, a, unrolled: bool = False) -> dict:
    cfg, tx = model_config(mixer, a)
    make = (lambda: LM(cfg, rngs=nnx.Rngs(0)).unstacked()) if unrolled else (
        lambda: LM(cfg, rngs=nnx.Rngs(0)))
    init = step.init_fn(make, tx)
    out = {}

    def shapes():
        out["graphdef"], state = init()
        return state

    state = jax.eval_shape(shapes)
    ids = jax.ShapeDtypeStruct((a.batch, a.seq_len), jnp.int32)
    batch = {"tokens": ids, "targets": ids, "segment_ids": ids,
             "mask": jax.ShapeDtypeStruct((a.batch, a.seq_len), jnp.float32)}
    train_step = jax.jit(step.make_train_step(out["graphdef"], tx), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    ops = len(re.findall(r"= (?:stablehlo|chlo|func)\.", lowered.as_text()))
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {"mixer": mixer, "form": "unrolled" if unrolled else "scan", "layers": a.layers,
            "d_model": a.d_model, "heads": a.heads, "seq_len": a.seq_len, "batch": a.batch,
            "params": int(params), "lower_s": t1 - t0, "compile_s": t2 - t1, "hlo_ops": ops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", nargs="+", default=list(MIXERS),
                   help="mixer names; 'gla+attention' is GLA with attention every 4th layer")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d_model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--unrolled", nargs="*", default=None, metavar="MIXER",
                   help="also compile these mixers' models unstacked (the unscanned baseline); "
                        "no name: every mixer")
    p.add_argument("--quick", action="store_true", help="d_model 64, 2 heads, T = 128")
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results")
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.heads, a.seq_len = 64, 2, 128
    rows, load_before = [], os.getloadavg()
    name = a.out or f"compile_time_{jax.devices()[0].platform}.json"

    def save():       # after every mixer: a run cut at its time limit keeps what it measured
        # wall-clock seconds: on a shared machine they grow with its load, recorded beside them
        return common.write_json(name, rows, what="train step (fwd + bwd + AdamW), lowered from "
                                 "abstract arrays and compiled, not run", quick=a.quick,
                                 cpus=os.cpu_count(), load_avg={"start": load_before,
                                                                "end": os.getloadavg()})
    path = None
    for mixer in a.mixers:
        baseline = a.unrolled is not None and (not a.unrolled or mixer in a.unrolled)
        for unrolled in (False, True) if baseline else (False,):
            row = measure(mixer, a, unrolled)
            rows.append(row)
            print(f"{mixer:<16} {row['form']:<9} {row['layers']} layers: lower "
                  f"{row['lower_s']:5.1f} s, compile {row['compile_s']:6.1f} s, "
                  f"{row['hlo_ops']:6d} StableHLO ops", flush=True)
            path = save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
