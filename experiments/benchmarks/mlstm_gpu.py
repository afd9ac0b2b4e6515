"""The mLSTM GPU kernel (impl="pallas") on the device: correctness, then timings.

    python -m experiments.benchmarks.mlstm_gpu [--shapes 8x2048 2x8192] [--sweep [NAME ..]]
    python -m experiments.benchmarks.mlstm_gpu --quick          # CPU, seconds: the script runs

1. Correctness, float32: impl="pallas" against impl="chunk" (and the lax.scan reference where T is
   short) at a few shapes, with packed documents, an initial state (C, n, m) and grouped heads:
   h, the final (C, n, m) and the gradients of q, k, v, i, f and the three state parts (random
   cotangents on h and on every part of the final state). Any relative error (||a - b|| / ||b||)
   above --tol prints FAIL and the script exits 1 before timing.
2. Timings, bf16 q, k, v, i, f, H = 16, K = V = 128 (--heads, --dim), B * T = 16384 (each BxT of
   --shapes): median ms of the forward and of forward + backward for pallas and chunk, against the
   floor of the shape (`cost`: the larger of its HBM bytes over the measured copy bandwidth and its
   FLOPs over the measured matmul rate, `common.floor_ms`). Writes
   benchmarks/results/mlstm_gpu_<device>.json. --sweep also times kernel configs
   (`TritonChunkConfig` fields over its device default, passed to the op as `config=`, or the
   op's `chunk_size`; impl "pallas:triton"), recorded as impl "pallas[name]"; the chunk is
   otherwise the op's chunk_size (--chunk).

--f32-dots ieee|tf32x3: the check alone, of the Triton kernel (impl="pallas:triton") with its
float32 products as named (`TritonChunkConfig.f32_dots`), written to
benchmarks/results/mlstm_gpu_<device>_<f32_dots>.json; no timings.

--quick: tiny shapes, 2 reps, checked against the chunk form only, pallas timed alone (runs in
interpret mode on a CPU in seconds).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks.scans_gpu import rel
from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.ops.mlstm import mlstm

DIFF = ("q", "k", "v", "i", "f", "C0", "n0", "m0")
CHECKS = [  # (B, T, Hk, H, K, V)
    (2, 300, 4, 4, 64, 64), (1, 1000, 2, 4, 128, 128), (2, 2048, 8, 8, 128, 128),
    (1, 4096, 4, 4, 64, 128)]
QUICK_CHECKS = [(1, 19, 1, 2, 8, 12)]
SWEEP = {"bv32": dict(block_v=32, block_v_out=32), "bv128": dict(block_v=128, block_v_out=128),
         "minprog64": dict(min_programs=64), "warps8": dict(warps_state=8, warps_out=8),
         "bwd_warps4": dict(warps_bwd=4), "stages3": dict(stages_state=3, stages_out=3),
         "chunk128": dict(chunk_size=128), "chunk256": dict(chunk_size=256)}


def inputs(B, T, Hk, H, K, V, dtype, seed=0):
    """xLSTM-like gates (input gate ~ N(0, 1), forget gate pre-activation ~ N(3, 1)), packed
    documents of ~1000 tokens and a random initial state."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    st = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    seg = jnp.asarray(np.cumsum(rng.uniform(size=(B, T)) < 1 / 1000, axis=1) % 3, jnp.int32)
    x = dict(q=f(B, T, Hk, K), k=f(B, T, Hk, K), v=f(B, T, H, V), i=f(B, T, H),
             f=jnp.asarray(3 + rng.standard_normal((B, T, H)), dtype), C0=st(B, H, K, V),
             n0=st(B, H, K), m0=st(B, H))
    return x, seg


def _fwd_bwd(impl, chunk, cot, config=None):
    def loss(x, seg):
        h, (C, n, m) = mlstm(x["q"], x["k"], x["v"], x["i"], x["f"],
                             initial_state=(x["C0"], x["n0"], x["m0"]), segment_ids=seg,
                             chunk_size=chunk, impl=impl, config=config)
        dh, dC, dn, dm = cot
        return (jnp.sum(h.astype(jnp.float32) * dh) + jnp.sum(C * dC) + jnp.sum(n * dn)
                + jnp.sum(m * dm)), (h, (C, n, m))
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _forward(impl, chunk, config=None):
    return jax.jit(lambda x, seg: mlstm(x["q"], x["k"], x["v"], x["i"], x["f"],
                                        initial_state=(x["C0"], x["n0"], x["m0"]),
                                        segment_ids=seg, chunk_size=chunk, impl=impl,
                                        config=config))


def check(shapes, chunk, tol, recurrent_up_to=1000, impl="pallas", config=None) -> list:
    rows = []
    for s, (B, T, Hk, H, K, V) in enumerate(shapes):
        x, seg = inputs(B, T, Hk, H, K, V, jnp.float32, seed=s)
        rng = np.random.default_rng(100 + s)
        cot = tuple(jnp.asarray(rng.standard_normal(a.shape), jnp.float32)
                    for a in (x["v"], x["C0"], x["n0"], x["m0"]))
        (_, (h, S)), g = _fwd_bwd(impl, chunk, cot, config)(x, seg)
        for ref in ("chunk",) + (("recurrent",) if T <= recurrent_up_to else ()):
            (_, (rh, rS)), rg = _fwd_bwd(ref, chunk, cot)(x, seg)
            errs = {"h": rel(h, rh),
                    **{f"final_{n}": rel(a, b) for n, a, b in zip("Cnm", S, rS, strict=True)},
                    **{f"d{n}": rel(g[n], rg[n]) for n in DIFF}}
            worst = max(errs.values())
            ok = worst <= tol
            rows.append({"B": B, "T": T, "Hk": Hk, "H": H, "K": K, "V": V, "ref": ref,
                         "errors": errs, "ok": ok})
            print(f"check B={B} T={T} Hk={Hk} H={H} K={K} V={V} vs {ref:<9} max rel err "
                  f"{worst:.2e} {'ok' if ok else 'FAIL ' + str(errs)}", flush=True)
    return rows


def cost(B, T, H, K, V, C, itemsize):
    """(forward, forward + backward) bytes and FLOPs. Forward: q, k, v, i, f read once, h
    written; 2 B H T (C K + C V + 2 K V) FLOPs (intra q k^T and P v, inter q S and the state
    update). Backward: the forward's inputs and dh read, their gradients written, twice the
    forward's FLOPs."""
    tok = B * T * H
    fwd_b = itemsize * tok * (2 * K + 2 * V + 2)
    bwd_b = itemsize * tok * (2 * (2 * K + V + 2) + V)
    flops = 2 * B * H * T * (C * K + C * V + 2 * K * V)
    return {"bytes": fwd_b, "flops": flops}, {"bytes": fwd_b + bwd_b, "flops": 3 * flops}


def time_shapes(shapes, H, D, chunk, reps, impls, sweep, rows, save, ceil):
    """Appends a row per (shape, impl) to `rows` and saves after each."""
    print(f"\nceilings: {ceil['bytes_per_s'] / 1e9:.0f} GB/s, {ceil['flop_per_s'] / 1e12:.1f} "
          f"TFLOP/s (float32 matmul)")
    print(f"{'impl':<18}{'B':>4}{'T':>7}{'fwd ms':>10}{'floor':>9}{'x':>8}"
          f"{'fwd+bwd ms':>12}{'floor':>9}{'x':>8}")
    base = TritonChunkConfig.default(jax.devices()[0])
    for B, T in shapes:
        x, seg = inputs(B, T, H, H, D, D, jnp.bfloat16)
        cot = (jnp.ones((B, T, H, D), jnp.float32), jnp.ones((B, H, D, D), jnp.float32),
               jnp.ones((B, H, D), jnp.float32), jnp.ones((B, H), jnp.float32))
        # (row name, impl, config fields over the default): the sweep is the Triton kernel's
        for impl, name, over in ([(i, i, {}) for i in impls]
                                 + [(f"pallas[{k}]", "pallas:triton", SWEEP[k]) for k in sweep]):
            over = dict(over)
            C = over.pop("chunk_size", chunk)      # the op's; the other keys are config fields
            c_f, c_a = cost(B, T, H, D, D, C, 2)
            floor_f, floor_a = common.floor_ms(c_f, ceil), common.floor_ms(c_a, ceil)
            row = {"impl": impl, "B": B, "T": T, "H": H, "K": D, "V": D, "dtype": "bfloat16",
                   "chunk_size": C, "fwd_floor_ms": floor_f, "fwdbwd_floor_ms": floor_a}
            _, err = common.run_variant(base, over, lambda cfg: common.time_fwd_bwd(
                row, _forward(name, C, (cfg,)), _fwd_bwd(name, C, cot, (cfg,)), x, seg,
                reps=reps))
            if err is not None:  # e.g. a config that does not compile
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                print(f"{impl:<18}{B:>4}{T:>7}  {row['error']}")
            rows.append(row)
            save()
            if err is None:
                print(f"{impl:<18}{B:>4}{T:>7}{row['fwd_ms']:>10.3f} {floor_f:>8.3g}"
                      f" {row['fwd_ms'] / floor_f:>7.3g}{row['fwdbwd_ms']:>12.3f} {floor_a:>8.3g}"
                      f" {row['fwdbwd_ms'] / floor_a:>7.3g}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["8x2048", "2x8192"], help="BxT (B*T = 16384)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128, help="K = V")
    p.add_argument("--chunk", type=int, default=64, help="the op's chunk_size")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4, help="float32 relative-error bound")
    p.add_argument("--sweep", nargs="*", default=None, metavar="NAME",
                   help=f"also time these kernel configs (all if none named): {', '.join(SWEEP)}")
    p.add_argument("--f32-dots", choices=("ieee", "tf32x3"), default=None,
                   help="check only the Triton kernel with these float32 products")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    checks = CHECKS
    if a.quick:
        shapes, a.heads, a.dim, a.reps, a.chunk, checks = [(1, 32)], 2, 16, 2, 16, QUICK_CHECKS

    sweep = list(SWEEP) if a.sweep == [] else (a.sweep or [])
    dev = jax.devices()[0].device_kind.replace(" ", "_")
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    kernel = {} if a.f32_dots is None else dict(
        impl="pallas:triton", config=TritonChunkConfig(f32_dots=a.f32_dots,
                                                       interpret=True if a.quick else None))
    check_rows, rows = check(checks, a.chunk, a.tol, 0 if a.quick else 1000, **kernel), []
    tag = f"_{a.f32_dots}" if a.f32_dots else ""
    save = lambda: common.write_json(
        f"mlstm_gpu_{dev}{tag}.json", rows, checks=check_rows, check_tol=a.tol, quick=a.quick,
        f32_dots=a.f32_dots,
        floor="max(HBM bytes / copy bandwidth, FLOPs / float32 matmul rate), both measured")
    if not all(r["ok"] for r in check_rows):
        save()
        print("FAILED: impl='pallas' disagrees with the XLA forms (see FAIL lines above)",
              file=sys.stderr)
        return 1
    if a.f32_dots:
        print(f"wrote {save()}")
        return 0
    ceil = common.measure_ceilings(*((1 << 22, 256) if a.quick else ()))
    impls = ["pallas"] if a.quick else ["pallas", "chunk"]
    time_shapes(shapes, a.heads, a.dim, a.chunk, a.reps, impls, sweep, rows, save, ceil)
    print(f"wrote {save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
