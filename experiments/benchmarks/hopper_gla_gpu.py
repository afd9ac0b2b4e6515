"""The Hopper (Mosaic GPU) GLA kernels (vector gate, `kernels/gpu/hopper/gla.py`) on the device:
correctness, then timings against the jax-linear-attention anchors.

    python -m experiments.benchmarks.hopper_gla_gpu [--quick] [--semantics lane|warpgroup]

(a) Checks: output, final state and gradients (q, k, v, g, initial state) against the float32 XLA
    chunk form run on float32 copies of the same inputs, by relative norm error (tolerance 1e-2):
    packed documents (a boundary inside a chunk and one at a chunk start) with initial states,
    T in {100, 2048}, K = V in {64, 128}, and a strong-decay case (every log decay in [-25, -15]:
    no NaN, exact gate gradient); without --quick also T = 8192, no documents, and K = 100, V = 48
    (padded); float32 inputs refused (ValueError); the strong-decay and the documents cases at
    T = 2048, K = 128 again with the fused gradient kernel (`gla_grad_key_blocks=False`; the
    default, one CTA per key block, has aliased SMEM that the CPU interpreter cannot run).
(b) Timings: bf16, H = 16, K = V = 128, B = max(1, 16384 // T), T in {2048, 8192, 32768},
    g = log_sigmoid(N(0, 1)) / 16 in float32 [B, T, H, K] (as probe_jla.py): forward and forward
    + backward (grad of sum(o * do) w.r.t. q, k, v, the anchors' protocol; every input a jit
    argument), as the median of back-to-back calls (`fwd_ms`, device time) and of calls each
    blocked on the host (`fwd_sync_ms`, how the jla anchors were timed), beside jla's gla timed
    the same ways in this run where its wheel is installed (`jla_run_*`), else its anchors, and
    the ratio (jla / ours, > 1 is faster); then each kernel alone at the first T (every T without
    --quick): gates, walk (with states), reverse walk, grad (and at K = 128 its other form,
    fused or per key block); at the first T also the whole op with the fused gradient kernel
    (`gla_grad_fused`) (`--no-breakdown`: the whole op only).
(c) Writes benchmarks/results/hopper_gla_gpu_<device>.json (and a copy under $OUT when set).

A check or timing that fails prints the last 30 lines of its traceback and the script goes on.
The lowering semantics are tried in the order given on the first check; the first that compiles
is used for the rest. Checks of one shape share their compiled functions.
Expected wall time with --quick on an H200: ~2 minutes, mostly compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import anchors as anchor_files
from experiments.benchmarks import common
from experiments.benchmarks import kernel_checks as kc
from experiments.benchmarks.kernel_checks import segments, tail
from linear_jax import ops
from linear_jax.kernels.configs import HopperChunkConfig, multiprocessors
from linear_jax.kernels.gpu.hopper import common as hcommon
from linear_jax.kernels.gpu.hopper import gla as hgla

TOL = 1e-2
f32 = jnp.float32


def inputs(B, T, H, K, V, *, gate, dtype, seed, extras):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)   # noqa: E731
    x = {"q": jnp.asarray(n(B, T, H, K), dtype),
         "k": jnp.asarray(n(B, T, H, K) / np.sqrt(K), dtype),
         "v": jnp.asarray(n(B, T, H, V), dtype),
         "do": jnp.asarray(n(B, T, H, V), dtype),
         "dS": jnp.asarray(n(B, H, K, V)), "S0": None, "seg": None}
    if gate == "strong":
        x["g"] = jnp.asarray(-15.0 - 10.0 * rng.uniform(size=(B, T, H, K)), f32)
    else:
        x["g"] = jax.nn.log_sigmoid(jnp.asarray(n(B, T, H, K))) / 16
    if extras:
        x["S0"] = jnp.asarray(n(B, H, K, V))
        x["seg"] = segments(B, T, rng)
    return x


def kernel_call(cfg, K):
    def call(x):
        return hgla.gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5, initial_state=x["S0"],
                        segment_ids=x["seg"], chunk_size=64, config=cfg)
    return call


def reference_call(K):
    def call(x):
        return ops.gla(x["q"], x["k"], x["v"], x["g"], scale=K**-0.5, initial_state=x["S0"],
                       segment_ids=x["seg"], impl="chunk")
    return call


@functools.cache
def jitted(call_of, cfg, K, names):
    """(forward, loss_and_grads) jitted once per (kernel or reference, config, K, names): checks
    of one shape share their compiles."""
    call = call_of(cfg, K) if cfg is not None else call_of(K)
    return jax.jit(call), jax.jit(kc.loss_and_grads(call, names))


def run_check(name, cfg, B, T, H, K, V, *, gate, extras, seed, peer=None):
    """A check of our kernels under `cfg`, or with `peer` (x -> (o, S): `kc.jla_call`) of that
    call, on the same inputs and against the same reference."""
    x = inputs(B, T, H, K, V, gate=gate, dtype=jnp.bfloat16, seed=seed, extras=extras)
    names = ("q", "k", "v", "g") + (("S0",) if x["S0"] is not None else ())
    kern = jitted(kernel_call, cfg, K, names) if peer is None else (
        jax.jit(peer), jax.jit(kc.loss_and_grads(peer, names)))
    return kc.check(x, names, kern,
                    jitted(reference_call, None, K, names)[1], tol=TOL, check=name, T=T, K=K,
                    V=V, B=B, H=H, gate=gate, extras=extras)


def kernel_breakdown(cfg, args, *, reps):
    """Device ms of each kernel alone (inputs prepared outside the timed call)."""
    q, k, v, g, do = args
    B, T, H, K = q.shape
    P = cfg.pieces_for(B * H, T // cfg.chunk, multiprocessors(jax.devices()[0]))
    t = lambda f, *a: common.median_ms(f, *a, reps=reps, inner=10)       # noqa: E731
    out = {"pieces": P}
    try:
        gh, gl = hcommon.split_hi_lo_xla(g, q.dtype)
        gates = jax.jit(lambda q, k, gh, gl: hgla.gates(q, k, gh, gl, None, scale=K**-0.5,
                                                        cfg=cfg))
        qt, kt, A, dec = gates(q, k, gh, gl)
        out["gates"] = t(gates, q, k, gh, gl)
        state = jax.jit(lambda y, z, d, rev: hgla.walk(None, y, z, None, d, None, reverse=rev,
                                                       cfg=cfg, pieces=P, emit="state"),
                        static_argnums=3)
        if P > 1:
            out["walk_state_pass"] = t(state, kt, v, dec, False)
            E, dp = state(kt, v, dec, False)
            s0 = hcommon.piece_states(E, dp, None, reverse=False)
        else:
            s0 = None
        walk = lambda res, rev: jax.jit(lambda x, y, z, A, d, s0: hgla.walk(   # noqa: E731
            x, y, z, A, d, s0, reverse=rev, cfg=cfg, residuals=res, pieces=P))
        out["walk"] = t(walk(False, False), qt, kt, v, A, dec, s0)
        out["walk_states"] = t(walk(True, False), qt, kt, v, A, dec, s0)
        _, _, states = walk(True, False)(qt, kt, v, A, dec, s0)
        _, _, dstates = walk(True, True)(kt, qt, do, A, dec, s0)
        out["walk_rev_states"] = t(walk(True, True), kt, qt, do, A, dec, s0)
        gradf = jax.jit(lambda *a: hgla.grad(*a, scale=K**-0.5, cfg=cfg))
        out["grad"] = t(gradf, q, k, v, do, gh, gl, None, states, dstates)
        if K > 64:                        # the other form of the gradient kernel
            other = dataclasses.replace(cfg, gla_grad_key_blocks=not cfg.gla_grad_key_blocks)
            gradb = jax.jit(lambda *a: hgla.grad(*a, scale=K**-0.5, cfg=other))
            name = "grad_key_blocks" if other.gla_grad_key_blocks else "grad_fused"
            out[name] = t(gradb, q, k, v, do, gh, gl, None, states, dstates)
    except Exception as e:  # noqa: BLE001
        out["error"] = tail(e, 8)
        print(f"kernel breakdown FAILED:\n{tail(e)}")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv=None) -> int:
    a = kc.parser().parse_args(argv)
    dev = jax.devices()[0]
    print("device", dev.device_kind, "jax", jax.__version__, "SMs", getattr(dev, "core_count", "?"))
    t_start = time.perf_counter()
    grid = [("docs+h0", 2, 100, 2, 64, 64, "normal", True),
            ("docs+h0", 2, 2048, 4, 128, 128, "normal", True),
            ("strong decay+docs+h0", 2, 2048, 4, 128, 128, "strong", True)]
    run = lambda i, c, cfg: run_check(c[0], cfg, *c[1:6], gate=c[6],  # noqa: E731
                                      extras=c[7], seed=100 + i)
    cfg, first = kc.pick_semantics(a.semantics.split(","), HopperChunkConfig.default(dev),
                                   lambda cfg: run(0, grid[0], cfg))
    checks, rows, peers = [], [], []
    if cfg is None:
        print("no lowering semantics compiled: nothing else to run")
    else:
        print("config", cfg)
        if not a.quick:
            grid += [("plain", 2, 2048, 4, 64, 64, "normal", False),
                     ("docs+h0", 1, 8192, 4, 128, 128, "normal", True),
                     ("strong decay", 1, 300, 2, 64, 64, "strong", False),
                     ("K=100 V=48 (padded)+docs+h0", 2, 300, 2, 100, 48, "normal", True)]
        # the gradient kernel's other form (the default: one CTA per key block, its SMEM
        # aliased, which the interpreter cannot run aliased; the other: one CTA per chunk)
        fused = dataclasses.replace(cfg, gla_grad_key_blocks=False)
        block_grid = [("grad fused: strong decay+docs+h0", 2, 2048, 4, 128, 128, "strong",
                       True), ("grad fused: docs+h0", 2, 2048, 4, 128, 128, "normal", True)]
        if not a.skip_checks:
            checks = kc.run_grid(grid, lambda i, c: run(i, c, cfg), done=[first])
            checks += kc.run_grid(block_grid, lambda i, c: run(len(grid) + i, c, fused))
            # jla's gla on the inputs of our checks 1 and 2 (documents, strong decay)
            peers = kc.peer_checks("gla", lambda x: {"g": x["g"]}, grid, (1, 2), run_check)
            # a run cut short in its timings keeps its checks
            common.write_json(common.device_file("hopper_gla_gpu"), rows, checks=checks,
                              partial=True, peer_checks=peers, config=dataclasses.asdict(cfg))
        x = jnp.zeros((1, 64, 1, 64), f32)
        checks.append(kc.float32_refused(lambda: hgla.gla(
            x, x, x, x, scale=1.0, initial_state=None, segment_ids=None, chunk_size=64)))

        anchor_path, anchors = anchor_files.anchors_for(dev.device_kind)
        print("anchors", anchor_path)
        for T in a.T:
            args = kc.timing_inputs(T, vector_gate=True)
            reps = 10 if a.quick else a.reps
            rows.append(kc.time_decay_op(hgla.gla, "gla", cfg, args, anchors, reps=reps,
                                              profile=a.profile))
            if not a.no_breakdown and ((not a.quick) or T == a.T[0]):
                rows[-1]["kernels_ms"] = kernel_breakdown(cfg, args, reps=reps)
            print(rows[-1])
            common.write_json(common.device_file("hopper_gla_gpu"), rows, checks=checks,
                              partial=True, peer_checks=peers, config=dataclasses.asdict(cfg))
            if T == a.T[0]:               # the whole op with the fused gradient kernel
                rows.append({"variant": "gla_grad_fused", **kc.time_decay_op(
                    hgla.gla, "gla", fused, args, anchors, reps=reps, jla_row=rows[-1])})
                print(rows[-1])
        kc.table(rows, "gla", label=lambda r: f"{r['T']:>6}" + (
            f" {r['variant']}" if "variant" in r else ""))
    return kc.finish("hopper_gla_gpu", rows, checks, t_start, peer_checks=peers,
                     config=dataclasses.asdict(cfg) if cfg else None, quick=a.quick,
                     tolerance=TOL,
                     shapes="bf16, H=16, K=V=128, B=max(1, 16384 // T); g = "
                            "log_sigmoid(N(0,1))/16 float32 [B,T,H,K]; checks bf16 vs "
                            "float32 chunk form on the same values")

if __name__ == "__main__":
    raise SystemExit(main())
