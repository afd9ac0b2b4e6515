"""Linear attention's normaliser on the device: the column of ones in v's dtype (the op), the
same column in float32 (the op until session 33), and z apart from the kernel (a candidate), with
the plain numerator as the floor.

    python -m experiments.benchmarks.normaliser_gpu                # the device
    python -m experiments.benchmarks.normaliser_gpu --quick        # CPU, seconds: the script runs

Forms, each jitted with every input an argument and impl "auto":
  column      `linear_attention(normalize=True)`: `simple_gla(q, k, [v, 1])` at V + 1 values in
              v's dtype, then o[:V] / (o[V] + eps);
  column_f32  the op before: v and the column in float32, so every kernel input is float32 and
              the Triton kernels multiply in IEEE float32 (Based's MQAR step at d512 took ~5 s on
              an H100 this way, session 33);
  split       the numerator through `linear_attention(normalize=False)` at V values, z a running
              sum of k by an element-wise scan in float32 (`chunk_scan`, a = 1);
  numerator   the split's kernel call alone.
`--forms` picks them (column always; default column, column_f32, split: on the device each form
is two compiles of tens of seconds per shape, and sessions 32 and 33 ran out their limits).
The split is not the op because it is less exact where the kernel can cancel to ~0 (ReBased:
`tests/ops/test_decay_family.py::test_normaliser_shares_the_numerators_products`).

Shapes: the MQAR cells whose step time this is about, in bfloat16 as the models run them (Based
d128 / d512: K = 153 compact Taylor features, V = 64 / 256; linear attention d64 / d128 / d256:
K = V = 32 / 64 / 128; batch 256 x 3 seeds, T = 256, 2 heads) and a language-model shape (B = 8,
T = 2048, H = 16, K = V = 128). On an H100 "auto" takes the Mosaic GPU kernels where K and V + 1
are at most 128 (linear attention d64 and d128: V + 1 = 33 and 65, padded to 64 and 128, which
the device has not checked before this script: its check is their check) and the Triton kernels
elsewhere.

Before timing, split and column_f32 are compared with column (output, final state, gradients of
q, k, v and the initial state) on positive features: a relative error above --tol prints FAIL
and the script exits 1. Timings are median ms of the forward and of forward + backward, the
forms interleaved (`common.sync_ms`), beside the shape's floor (`common.decay_family_cost`, no
gate, the numerator's bytes and FLOPs). Writes benchmarks/results/normaliser_gpu_<device>.json
after every shape.
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

SHAPES = {  # name: (B, T, H, K, V, dtype), in the order they run (JSON after each)
    "based_d512": (768, 256, 2, 153, 256, "bfloat16"),
    "linear_attention_d128": (768, 256, 2, 64, 64, "bfloat16"),
    "based_d128": (768, 256, 2, 153, 64, "bfloat16"),
    "linear_attention_d64": (768, 256, 2, 32, 32, "bfloat16"),
    "linear_attention_d256": (768, 256, 2, 128, 128, "bfloat16"),
    "lm_bf16": (8, 2048, 16, 128, 128, "bfloat16"),
}
QUICK = {"tiny": (2, 40, 2, 9, 6, "float32"), "tiny_bf16": (2, 40, 2, 9, 6, "bfloat16")}
FORMS = ("column", "column_f32", "split", "numerator")
DEFAULT_FORMS = ("column", "column_f32", "split")
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
    if form in ("column", "column_f32"):
        vin = v if form == "column" else v.astype(jnp.float32)
        o, S = linear_attention(q, k, vin, normalize=True, scale=1.0, initial_state=S0,
                                segment_ids=seg)
        return o.astype(v.dtype), S
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
    """split and column_f32 (those of them timed) against column; `compiled`: {form: (forward,
    value_and_grad)}, each jitted once."""
    (ro, rS), (_, rg) = compiled["column"][0](x, seg), compiled["column"][1](x, seg)
    compared = [f for f in ("split", "column_f32") if f in compiled]
    errs = {}
    for form in compared:
        (o, S), (_, g) = compiled[form][0](x, seg), compiled[form][1](x, seg)
        errs.update({f"{form}_o": rel(o, ro), f"{form}_final_state": rel(S, rS),
                     **{f"{form}_d{n}": rel(g[n], rg[n]) for n in ("q", "k", "v", "S0")}})
    worst = max(errs.values(), default=0.0)
    ok = bool(worst <= tol)
    print(f"check {name}: {', '.join(compared) or 'nothing'} vs column, max rel err {worst:.2e} "
          f"{'ok' if ok else 'FAIL ' + str(errs)}", flush=True)
    return {"shape": name, "errors": errs, "ok": ok}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", help=f"names among {sorted(SHAPES)} (default: all)")
    p.add_argument("--forms", nargs="*", choices=FORMS, default=list(DEFAULT_FORMS),
                   help=f"among {FORMS}, column always (default: {' '.join(DEFAULT_FORMS)}; each "
                        f"form is two compiles per shape)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tol", type=float, default=None,
                   help="relative error allowed (default 1e-4 float32, 2e-2 bf16)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    forms = ["column"] + [f for f in FORMS if f in args.forms and f != "column"]
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
        compiled = {f: fns(f) for f in forms}
        checks.append(check(name, compiled, x, seg, tol))
        if not checks[-1]["ok"]:
            continue
        fwd = common.sync_ms([compiled[f][0] for f in forms], x, seg, reps=reps)
        both = common.sync_ms([compiled[f][1] for f in forms], x, seg, reps=reps)
        itemsize = jnp.dtype(dtype).itemsize
        cost = common.decay_family_cost(B, T, H, K, V, 64, "none", itemsize)
        floor = common.floor_ms(cost, ceil)
        for form, f_ms, b_ms in zip(forms, fwd, both, strict=True):
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
