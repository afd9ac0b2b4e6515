"""Linear attention's normaliser on the device: as a column of ones appended to v (the op) or
apart from the kernel (a candidate), with the plain numerator as the floor of the second.

    python -m experiments.benchmarks.normaliser_gpu                # the device
    python -m experiments.benchmarks.normaliser_gpu --quick        # CPU, seconds: the script runs

Forms, each jitted with every input an argument and impl "auto":
  column     `linear_attention(normalize=True)`: `simple_gla(q, k, [v, 1])` in float32 at V + 1
             values, then o[:V] / (o[V] + eps) (Based d128 at V = 64 hands the kernels 65 columns,
             padded to 80; bf16 inputs never reach the Hopper kernels);
  split      the numerator through `linear_attention(normalize=False)` at V values in v's dtype, z
             a running sum of k by an element-wise scan in float32 (`chunk_scan`, a = 1);
  numerator  the split's kernel call alone.
The split is not the op because it is less exact where the kernel can cancel to ~0 (ReBased:
`tests/ops/test_decay_family.py::test_normaliser_shares_the_numerators_products`); this script
measures what it would buy where the kernel stays away from 0 (Based's Taylor kernel >= 1/2, elu
+ 1), to decide whether such maps should take it.

Shapes: the MQAR cells whose step time this is about (Based d128: K = 153 compact Taylor
features, V = 64; linear attention d256: K = V = 128; batch 256 x 3 seeds, T = 256, 2 heads,
float32) and a bf16 language-model shape (B = 8, T = 2048, H = 16, K = V = 128), where the split
hands the Hopper kernels bf16 and the column form float32.

Before timing, split and column are compared (output, final state, gradients of q, k, v and
the initial state) on positive features: a relative error above --tol prints FAIL and the script
exits 1. Timings are median ms of the forward and of forward + backward, the forms interleaved
(`common.sync_ms`), beside the shape's floor (`common.decay_family_cost`, no gate, the
numerator's bytes and FLOPs). Writes benchmarks/results/normaliser_gpu_<device>.json after every
shape.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks.scans_gpu import rel
from linear_jax.ops.common.elementwise_chunk import chunk_scan
from linear_jax.ops.linear_attention import linear_attention

SHAPES = {  # name: (B, T, H, K, V, dtype)
    "based_d128": (768, 256, 2, 153, 64, "float32"),
    "linear_attention_d256": (768, 256, 2, 128, 128, "float32"),
    "lm_bf16": (8, 2048, 16, 128, 128, "bfloat16"),
}
QUICK = {"tiny": (2, 40, 2, 9, 6, "float32"), "tiny_bf16": (2, 40, 2, 9, 6, "bfloat16")}
FORMS = ("split", "column", "numerator")
EPS = 1e-6


def inputs(B, T, H, K, V, dtype, seed=0):
    """Positive features (as a feature map gives), values ~ N(0, 1), packed documents of ~100
    tokens and a random non-negative initial state (z must stay positive)."""
    rng = np.random.default_rng(seed)
    pos = lambda *s: jnp.asarray(np.exp(0.3 * rng.standard_normal(s)) / np.sqrt(s[-1]), dtype)
    seg = jnp.asarray(np.cumsum(rng.uniform(size=(B, T)) < 1 / 100, axis=1), jnp.int32)
    x = dict(q=pos(B, T, H, K), k=pos(B, T, H, K),
             v=jnp.asarray(rng.standard_normal((B, T, H, V)), dtype),
             S0=jnp.asarray(np.abs(rng.standard_normal((B, H, K, V + 1))), jnp.float32))
    return x, seg


def run(form, x, seg):
    q, k, v, S0 = x["q"], x["k"], x["v"], x["S0"]
    if form == "column":
        return linear_attention(q, k, v, normalize=True, scale=1.0, initial_state=S0,
                                segment_ids=seg)
    o, S = linear_attention(q, k, v, scale=1.0, initial_state=S0[..., :-1], segment_ids=seg)
    if form == "numerator":
        return o, S
    kf = k.astype(jnp.float32)
    z, zT = chunk_scan(jnp.ones_like(kf), kf, initial_state=S0[..., -1], segment_ids=seg,
                       chunk_size=64)
    den = jnp.einsum("bthk,bthk->bth", q.astype(jnp.float32), z, precision="highest")
    o = o.astype(jnp.float32) / (den[..., None] + EPS)
    return o.astype(v.dtype), jnp.concatenate([S, zT[..., None]], -1)


def fns(form):
    fwd = jax.jit(lambda x, seg: run(form, x, seg))

    def loss(x, seg):
        o, S = run(form, x, seg)
        return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(jnp.cos(S))
    return fwd, jax.jit(jax.value_and_grad(loss))


def check(name, compiled, x, seg, tol) -> dict:
    """split against column; `compiled`: {form: (forward, value_and_grad)}, each jitted once."""
    (o, S), (_, g) = compiled["split"][0](x, seg), compiled["split"][1](x, seg)
    (ro, rS), (_, rg) = compiled["column"][0](x, seg), compiled["column"][1](x, seg)
    errs = {"o": rel(o, ro), "final_state": rel(S, rS),
            **{f"d{n}": rel(g[n], rg[n]) for n in ("q", "k", "v", "S0")}}
    worst = max(errs.values())
    ok = bool(worst <= tol)
    print(f"check {name}: split vs column, max rel err {worst:.2e} "
          f"{'ok' if ok else 'FAIL ' + str(errs)}", flush=True)
    return {"shape": name, "errors": errs, "ok": ok}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", help=f"names among {sorted(SHAPES)} (default: all)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--tol", type=float, default=None,
                   help="relative error allowed (default 1e-4 float32, 2e-2 bf16)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    table = QUICK if args.quick else SHAPES
    names = args.shapes or list(table)
    reps = 2 if args.quick else args.reps
    ceil = common.measure_ceilings(1 << 20, 256) if args.quick else common.measure_ceilings()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; ceilings "
          f"{ceil['bytes_per_s'] / 1e9:.0f} GB/s, {ceil['flop_per_s'] / 1e12:.1f} TFLOP/s")
    checks, rows = [], []
    for name in names:
        B, T, H, K, V, dtype = table[name]
        x, seg = inputs(B, T, H, K, V, jnp.dtype(dtype))
        tol = args.tol or (1e-4 if dtype == "float32" else 2e-2)
        # one jit per form and pass, shared by the check and the timing: on the device each
        # compile of these shapes takes tens of seconds (session 32's run was cut at 200 s while
        # compiling them twice)
        compiled = {f: fns(f) for f in FORMS}
        checks.append(check(name, compiled, x, seg, tol))
        if not checks[-1]["ok"]:
            continue
        fwd = common.sync_ms([compiled[f][0] for f in FORMS], x, seg, reps=reps)
        both = common.sync_ms([compiled[f][1] for f in FORMS], x, seg, reps=reps)
        itemsize = jnp.dtype(dtype).itemsize
        cost = common.decay_family_cost(B, T, H, K, V, 64, "none", itemsize)
        floor = common.floor_ms(cost, ceil)
        for form, f_ms, b_ms in zip(FORMS, fwd, both, strict=True):
            rows.append({"shape": name, "B": B, "T": T, "H": H, "K": K, "V": V, "dtype": dtype,
                         "form": form, "fwd_ms": f_ms, "fwdbwd_ms": b_ms,
                         "floor_fwd_ms": floor})
            print(f"{name:<24}{form:<11}fwd {f_ms:8.3f} ms   fwd+bwd {b_ms:8.3f} ms   "
                  f"(fwd floor {floor:.3f} ms)", flush=True)
        if not args.quick:           # after every shape: a run cut by its time limit keeps them
            path = common.write_json(common.device_file("normaliser_gpu"), rows, checks=checks,
                                     ceilings=ceil, reps=reps)
            print(f"wrote {path}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
