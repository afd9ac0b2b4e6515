"""Decode throughput against context length: linear mixers (O(1) state per token) vs softmax
attention with a KV cache (O(context) per token).

    python -m experiments.benchmarks.decode [--contexts 256 1024 4096] [--mixers gla attention]
                                            [--quick]

For each mixer and context length L: a model of that mixer is prefilled with L tokens in calls of
`--piece` tokens carrying the cache (one piece bounds attention's [piece, L] score matrix), then
`--steps` single-token decode steps are timed: the jitted step of `generate`
(`linear_jax.models.generate.decode_fns`), compiled once and reused across steps and contexts of
one mixer. Prints tokens/s and writes benchmarks/results/decode_<platform>.json with the compile
time of the step.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks import common
from linear_jax.models import LM, LMConfig
from linear_jax.models.generate import decode_fns


def measure(mixer: str, L: int, a) -> dict:
    cfg = LMConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers,
                   num_heads=a.heads, mixer=mixer, chunk_size=64)
    model = LM(cfg, rngs=nnx.Rngs(0))
    params, prefill, step = decode_fns(model)
    prompt = jax.random.randint(jax.random.key(0), (a.batch, L), 0, a.vocab)
    cache = model.init_cache(a.batch, L + a.steps + 2)
    rng = jax.random.key(1)
    piece = min(L, a.piece)
    t0 = time.perf_counter()
    for s in range(0, L, piece):
        token, cache = prefill(params, prompt[:, s:s + piece], cache, rng)
    jax.block_until_ready(token)
    prefill_s = time.perf_counter() - t0                     # includes compilation
    t0 = time.perf_counter()
    token, cache = jax.block_until_ready(step(params, token, cache, rng))
    compile_s = time.perf_counter() - t0                     # first step: compile + run
    token, cache = jax.block_until_ready(step(params, token, cache, rng))   # warm
    t0 = time.perf_counter()
    for _ in range(a.steps):
        token, cache = step(params, token, cache, rng)
    jax.block_until_ready(token)
    dt = time.perf_counter() - t0
    return {"mixer": mixer, "context": L, "batch": a.batch, "d_model": a.d_model,
            "layers": a.layers, "heads": a.heads, "steps": a.steps,
            "tokens_per_s": a.batch * a.steps / dt, "ms_per_step": 1e3 * dt / a.steps,
            "step_compile_s": compile_s, "prefill_s_incl_compile": prefill_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--piece", type=int, default=1024, help="prefill call length")
    p.add_argument("--mixers", nargs="+", default=["gla", "gated_deltanet", "mamba2",
                                                   "attention"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="contexts 256 and 2048, 16 steps")
    a = p.parse_args(argv)
    if any(L % min(L, a.piece) for L in a.contexts):
        p.error(f"every context must be a multiple of --piece={a.piece} (or shorter than it)")
    if a.quick:
        a.contexts, a.steps = [256, 2048], 16
    rows = []
    for mixer in a.mixers:
        for L in a.contexts:
            row = measure(mixer, L, a)
            rows.append(row)
            print(f"{mixer:<16} context {L:>6}  {row['tokens_per_s']:9.1f} tok/s  "
                  f"{row['ms_per_step']:8.2f} ms/step  "
                  f"(step compile {row['step_compile_s']:.1f} s)")
    dtype = jnp.dtype(jnp.float32).name
    path = common.write_json(f"decode_{jax.devices()[0].platform}.json", rows, dtype=dtype)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
