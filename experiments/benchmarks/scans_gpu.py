"""The selective scan's GPU kernel (impl="pallas") on the device: correctness, then timings.

    python -m experiments.benchmarks.scans_gpu [--shapes 4x4096 16x1024] [--sweep [NAME ..]]
    python -m experiments.benchmarks.scans_gpu --quick          # CPU, seconds: the script runs

1. Correctness, float32: impl="pallas" against impl="chunk" (and the lax.scan reference where T is
   short) at a few shapes, with packed documents, an initial state and grouped B / C (every second
   shape also with D, z, delta_bias and softplus): outputs, final states and the gradients of
   every float input. Any relative error
   (||a - b|| / ||b||) above --tol prints FAIL and the script exits 1 before timing.
2. Timings, bf16 inputs, D = 2048 channels, N = 16, B * T = 16384 (each BxT of --shapes): median ms
   of the forward and of forward + backward for pallas, chunk and one `lax.associative_scan` over
   the whole sequence (materialises [B, T, D, N]), against the HBM floor: every input read once and
   every output written once (backward: inputs and dy read, gradients written) at --bw bytes/s.
   Writes benchmarks/results/scans_gpu_<device>.json. (The op casts bf16 inputs to float32 and
   forms dt * u in XLA before the kernel, so every impl moves more than this floor.) --sweep also
   times kernel configs (`TritonSelectiveConfig` fields over its device default, passed to the op
   as `config=`; impl "pallas:triton"), recorded as impl "pallas[name]".

--quick: tiny shapes, chunk_size 4 and 2 reps (runs in interpret mode on a CPU in seconds).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks.scans_xla import _selective_assoc
from linear_jax.kernels.configs import TritonSelectiveConfig
from linear_jax.ops.selective_scan import selective_scan

CHECKS = [  # (B, T, D, N, G): G None means B, C [B, T, N]
    (2, 300, 64, 16, None), (1, 1000, 96, 6, 2), (2, 2048, 256, 16, None), (1, 4096, 512, 16, 4)]
QUICK_CHECKS = [(2, 19, 24, 3, 2)]
# the default is chunk 8, every chunk step by step; chunk 16 takes the time-parallel path where
# a chunk's decay is mild (benchmarks/NOTES.md)
SWEEP = {"chunk4": dict(chunk=4), "chunk16": dict(chunk=16),
         "chunk16_seq": dict(chunk=16, parallel=False), "bd16": dict(block_d=16),
         "bd64": dict(block_d=64), "warps2": dict(warps=2, warps_bwd=2)}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(B, T, D, N, G, dtype, seed=0, options=False):
    """The op's inputs; with `options` also D, z and delta_bias (and softplus: see `_impl`)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    bc = (B, T, N) if G is None else (B, T, G, N)
    seg = jnp.asarray(np.cumsum(rng.uniform(size=(B, T)) < 1 / 300, axis=1) % 3, jnp.int32)
    x = dict(u=f(B, T, D), delta=jnp.asarray(np.abs(0.1 * rng.standard_normal((B, T, D))), dtype),
             A=-jnp.exp(jnp.asarray(rng.standard_normal((D, N)), jnp.float32)), B=f(*bc),
             C=f(*bc), initial_state=jnp.asarray(rng.standard_normal((B, D, N)), jnp.float32))
    if options:
        x.update(D=f(D).astype(jnp.float32), z=f(B, T, D),
                 delta_bias=jnp.asarray(rng.uniform(-4, -1, D), jnp.float32))
    return x, seg


def _impl(impl, chunk, config=None):
    if impl == "assoc":
        return lambda x, seg: _selective_assoc(**{k: v.astype(jnp.float32) for k, v in x.items()},
                                               segment_ids=seg)
    return lambda x, seg: selective_scan(**x, delta_softplus="delta_bias" in x, segment_ids=seg,
                                         chunk_size=chunk, impl=impl, config=config)


def _fwd_bwd(fn, dy, dS):
    def loss(x, seg):
        y, S = fn(x, seg)
        return jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(S * dS), (y, S)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def check(shapes, chunk, tol) -> list:
    rows = []
    for i, (B, T, D, N, G) in enumerate(shapes):
        x, seg = inputs(B, T, D, N, G, jnp.float32, seed=i, options=i % 2 == 1)
        rng = np.random.default_rng(100 + i)
        dy = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
        dS = jnp.asarray(rng.standard_normal((B, D, N)), jnp.float32)
        (_, (y, S)), g = _fwd_bwd(_impl("pallas", chunk), dy, dS)(x, seg)
        for ref in ("chunk",) + (("recurrent",) if T <= 1000 else ()):
            (_, (ry, rS)), rg = _fwd_bwd(_impl(ref, chunk), dy, dS)(x, seg)
            errs = {"y": rel(y, ry), "final_state": rel(S, rS),
                    **{f"d{n}": rel(g[n], rg[n]) for n in g}}
            worst = max(errs.values())
            ok = worst <= tol
            rows.append({"B": B, "T": T, "D": D, "N": N, "G": G, "ref": ref, "errors": errs,
                         "ok": ok})
            print(f"check B={B} T={T} D={D} N={N} G={G} vs {ref:<9} max rel err {worst:.2e} "
                  f"{'ok' if ok else 'FAIL ' + str(errs)}")
    return rows


def hbm_bytes(B, T, D, N, itemsize):
    """Fewest bytes moved: forward reads u, delta, B, C (itemsize), A, h0 (f32), writes y, hT;
    the backward reads them again and dy, dhT, and writes du, ddelta, dB, dC, dA, dh0."""
    seq, bc, state = B * T * D * itemsize, 2 * B * T * N * itemsize, B * D * N * 4
    fwd = (2 * seq + bc + D * N * 4 + state) + (seq + state)
    bwd = (3 * seq + bc + D * N * 4 + 2 * state) + (2 * seq + bc + D * N * 4 + state)
    return fwd, fwd + bwd


def time_shapes(shapes, D, N, chunk, reps, bw, sweep, rows, save):
    """Appends a row per (shape, impl) to `rows` and saves after each (the associative scan runs
    last: at full size it may run out of memory)."""
    print(f"\n{'impl':<16}{'B':>4}{'T':>7}{'D':>6}{'N':>4}{'fwd ms':>10}{'floor':>9}{'x':>8}"
          f"{'fwd+bwd ms':>12}{'floor':>9}{'x':>8}")
    base = TritonSelectiveConfig.default(jax.devices()[0])
    for B, T in shapes:
        x, seg = inputs(B, T, D, N, None, jnp.bfloat16)
        dy = jnp.ones((B, T, D), jnp.float32)
        dS = jnp.ones((B, D, N), jnp.float32)
        fwd_b, all_b = hbm_bytes(B, T, D, N, 2)
        floor_f, floor_a = 1e3 * fwd_b / bw, 1e3 * all_b / bw
        # (row name, impl, config fields over the default): the sweep is the Triton kernel's
        for impl, name, over in ([("pallas", "pallas", {}), ("chunk", "chunk", {})]
                                 + [(f"pallas[{k}]", "pallas:triton", SWEEP[k]) for k in sweep]
                                 + [("assoc", "assoc", {})]):
            row = {"impl": impl, "B": B, "T": T, "D": D, "N": N, "dtype": "bfloat16",
                   "chunk_size": chunk, "fwd_floor_ms": floor_f, "fwdbwd_floor_ms": floor_a}

            def measure(cfg, name=name, row=row):
                fn = _impl(name, chunk, (cfg,))
                return common.time_fwd_bwd(row, jax.jit(fn), _fwd_bwd(fn, dy, dS), x, seg,
                                           reps=reps)
            _, err = common.run_variant(base, over, measure)
            if err is not None:  # e.g. the associative scan out of memory
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                print(f"{impl:<16}{B:>4}{T:>7}{D:>6}{N:>4}  {row['error']}")
            rows.append(row)
            save()
            if err is None:
                print(f"{impl:<16}{B:>4}{T:>7}{D:>6}{N:>4}{row['fwd_ms']:>10.3f} {floor_f:>8.3g}"
                      f" {row['fwd_ms'] / floor_f:>7.3g}{row['fwdbwd_ms']:>12.3f} {floor_a:>8.3g}"
                      f" {row['fwdbwd_ms'] / floor_a:>7.3g}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4x4096", "16x1024"], help="BxT (B*T = 16384)")
    p.add_argument("--dim", type=int, default=2048, help="channels D")
    p.add_argument("--state", type=int, default=16, help="state size N")
    p.add_argument("--chunk", type=int, default=64, help="the op's chunk_size")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-4, help="float32 relative-error bound")
    p.add_argument("--bw", type=float, default=3e12, help="HBM bytes/s of the floor")
    p.add_argument("--sweep", nargs="*", default=None, metavar="NAME",
                   help=f"also time these kernel configs (all if none named): {', '.join(SWEEP)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps")
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes]
    checks = CHECKS
    if a.quick:
        shapes, a.dim, a.state, a.reps, a.chunk, checks = [(2, 32)], 32, 4, 2, 4, QUICK_CHECKS

    sweep = list(SWEEP) if a.sweep == [] else (a.sweep or [])
    dev = jax.devices()[0].device_kind.replace(" ", "_")
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    check_rows, rows = check(checks, a.chunk, a.tol), []
    save = lambda: common.write_json(
        f"scans_gpu_{dev}.json", rows, checks=check_rows, check_tol=a.tol, quick=a.quick,
        floor=f"HBM bytes (inputs read once, outputs written once) at {a.bw:.3g} B/s")
    if not all(r["ok"] for r in check_rows):
        save()
        print("FAILED: impl='pallas' disagrees with the XLA forms (see FAIL lines above)",
              file=sys.stderr)
        return 1
    time_shapes(shapes, a.dim, a.state, a.chunk, a.reps, a.bw, sweep, rows, save)
    print(f"wrote {save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
