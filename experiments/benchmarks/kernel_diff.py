"""Which Hopper kernel is wrong: every Mosaic GPU kernel call of an op, compiled on the GPU, against
the same kernel run in jax's GPU interpreter on the CPU with the very same inputs.

    python -m experiments.benchmarks.kernel_diff [--ops gla,simple_gla,selective,mlstm,delta]
        [--case "K=128 V=128"] [--dry-run]

An op-level check (check_gpu, hopper_*_gpu) says that an output or a gradient is wrong; this says
which kernel made it so. The op runs twice, eagerly (no jit, so every kernel call sees concrete
arrays), forward and backward: first on the GPU with `interpret=False`, recording each kernel
call's name, inputs and outputs; then on the CPU with `interpret=True`, where each kernel call
in turn is fed the inputs the GPU call got, and its outputs are compared with the GPU's by
relative norm error (and counts of non-finite values). The interpreter runs the same TMA copies,
barriers, masks and gate algebra, with each wgmma as a float32 `jnp.dot`, so an output the two
disagree on by more than bf16 rounding points at the compiled kernel's register layouts, wgmma
operands or warpgroup synchronisation, the parts only the device runs.

Writes benchmarks/results/kernel_diff_<device>.json (and a copy under $OUT when set).
Expected wall time on an H200: a few minutes (the interpreter is slow; the shapes are small).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import kernel_checks as kc
from experiments.benchmarks.kernel_checks import tail
from linear_jax import _compat, ops
from linear_jax.kernels.configs import (
    HopperChunkConfig,
    HopperDeltaConfig,
    HopperMlstmConfig,
    HopperSelectiveConfig,
)

MODULES = ("common", "decay", "decay_grad", "gla", "delta", "delta_bwd", "selective", "mlstm",
           "mlstm_fwd", "mlstm_bwd")
f32 = jnp.float32


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(a) & np.isfinite(b)
    den = np.linalg.norm(np.where(fin, b, 0.0))
    return float(np.linalg.norm(np.where(fin, a - b, 0.0)) / max(den, 1e-30))


def _where(g, c) -> dict:
    """Where two arrays differ: rel error per index of axis 0, per 64-slice of axis 1, per index
    of axis 2 and per 64-slice of axis 3 (for [B, Tp, H, K] that is per batch row, chunk, head
    and 64-column key block); "cell" per (batch row, chunk); "row8" / "rowmod8" per 8-row group
    of the chunk and per row mod 8 (a register or swizzle layout fault shows as a pattern there),
    and for [B, Tp, H, K] "col8" per 8-column group of each 64-column key block."""
    g, c = np.asarray(g, np.float64), np.asarray(c, np.float64)
    out = {}
    for ax, step in ((0, 1), (1, 64), (2, 1), (3, 64)):
        if g.ndim <= ax or g.shape[ax] <= step:
            continue
        errs = []
        for s in range(0, g.shape[ax], step):
            sl = (slice(None),) * ax + (slice(s, s + step),)
            errs.append(round(_rel(g[sl], c[sl]), 4))
        out[f"axis{ax}"] = errs
    if g.ndim >= 2 and g.shape[1] % 64 == 0:             # [B, Tp, ...]: within the chunk
        rows = lambda sl: round(_rel(g[:, sl], c[:, sl]), 4)                # noqa: E731
        blocks = g.shape[1] // 64
        out["cell"] = [[round(_rel(g[b, 64 * n:64 * n + 64], c[b, 64 * n:64 * n + 64]), 4)
                        for n in range(blocks)] for b in range(g.shape[0])]
        at = lambda f: np.concatenate([np.arange(64 * n, 64 * n + 64)[f(np.arange(64))]  # noqa
                                       for n in range(blocks)])
        out["row8"] = [rows(at(lambda r, j=j: r // 8 == j)) for j in range(8)]
        out["rowmod8"] = [rows(at(lambda r, j=j: r % 8 == j)) for j in range(8)]
    if g.ndim == 4 and g.shape[3] % 64 == 0:              # [B, Tp, H, K]: 8-column groups
        cols = lambda j: np.concatenate([np.arange(s, s + 8) + 8 * j            # noqa: E731
                                         for s in range(0, g.shape[3], 64)])
        out["col8"] = [round(_rel(g[..., cols(j)], c[..., cols(j)]), 4) for j in range(8)]
    return out


def _nonfinite(x) -> int:
    return int((~np.isfinite(np.asarray(x, np.float32))).sum())


class Recorder:
    """Wraps `mosaic_gpu_kernel` in every Hopper kernel module: "record" keeps each call's
    (name, inputs, outputs); "replay" runs each call on the recorded inputs and compares."""

    def __init__(self):
        self.mode, self.calls, self.report, self.i = "record", [], [], 0

    def wrap(self, real):
        def make(body, **kw):
            kernel = real(body, **kw)
            name = kw["name"]

            def call(*args):
                if self.mode == "record":
                    out = kernel(*args)
                    outs = list(out) if isinstance(out, (list, tuple)) else [out]
                    self.calls.append((name, [np.asarray(a) for a in args],
                                       [np.asarray(o) for o in outs]))
                    return out
                rname, ins, gpu_outs = self.calls[self.i]
                self.i += 1
                if rname != name:
                    raise RuntimeError(f"call {self.i - 1}: the GPU ran {rname}, the CPU {name}")
                out = kernel(*[jnp.asarray(a) for a in ins])
                outs = list(out) if isinstance(out, (list, tuple)) else [out]
                self.report.append(dict(
                    call=self.i - 1, kernel=name,
                    outputs=[dict(shape=list(g.shape), rel=_rel(g, c),
                                  gpu_nonfinite=_nonfinite(g), cpu_nonfinite=_nonfinite(c),
                                  where=_where(g, c) if not _rel(g, c) <= 1e-3 else None)
                             for g, c in zip(gpu_outs, outs, strict=True)]))
                gpu = [jnp.asarray(g) for g in gpu_outs]       # downstream sees the GPU's values
                return gpu if isinstance(out, (list, tuple)) else gpu[0]
            return call
        return make

    @contextlib.contextmanager
    def patched(self):
        mods = [importlib.import_module(f"linear_jax.kernels.gpu.hopper.{m}") for m in MODULES]
        mods = [m for m in mods if hasattr(m, "mosaic_gpu_kernel")]
        real = _compat.mosaic_gpu_kernel
        for m in mods:
            m.mosaic_gpu_kernel = self.wrap(real)
        try:
            yield
        finally:
            for m in mods:
                m.mosaic_gpu_kernel = real


def _chunk_case(op_name, K, V, over, B=1, T=256, H=2, seed=0, strong=False):
    """(entry(cfg) -> f(*floats), config, float inputs, cotangents) for simple_gla / gla / delta;
    over["pieces"] None: the device's choice; strong: every log decay in [-25, -15] (the strong
    decay checks of the Hopper scripts)."""
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)         # noqa: E731
    bf = jnp.bfloat16
    q, k, v = (jnp.asarray(n(B, T, H, K), bf), jnp.asarray(n(B, T, H, K) / np.sqrt(K), bf),
               jnp.asarray(n(B, T, H, V), bf))
    S0, seg = jnp.asarray(n(B, H, K, V)), kc.segments(B, T, rng)
    gshape = (B, T, H, K) if op_name == "gla" else (B, T, H)
    if strong:
        g = jnp.asarray(-15.0 - 10.0 * rng.uniform(size=gshape), f32)
    else:
        g = jax.nn.log_sigmoid(jnp.asarray(n(*gshape))) / 4
    floats = [q, k, v, g, S0]
    if op_name == "delta":
        from linear_jax.kernels.gpu.hopper import delta as mod
        kn = k.astype(f32) / jnp.linalg.norm(k.astype(f32), axis=-1, keepdims=True)
        floats[1] = kn.astype(bf)
        floats.insert(4, jax.nn.sigmoid(jnp.asarray(n(B, T, H))))

        def entry(cfg):
            if cfg is None:                                   # the float32 chunk form
                return lambda q, k, v, g, beta, S0: ops.gated_delta_rule(
                    q, k, v, g, beta, scale=K**-0.5, initial_state=S0, segment_ids=seg,
                    impl="chunk")
            return lambda q, k, v, g, beta, S0: mod.delta(
                q, k, v, g, beta, scale=K**-0.5, initial_state=S0, segment_ids=seg,
                chunk_size=64, config=cfg)
        base = HopperDeltaConfig(programs=8, **over)
    else:
        mod = importlib.import_module(
            f"linear_jax.kernels.gpu.hopper.{'gla' if op_name == 'gla' else 'decay'}")
        fn = mod.gla if op_name == "gla" else mod.simple_gla

        def entry(cfg):
            if cfg is None:                                   # the float32 chunk form
                op = getattr(ops, "gla" if op_name == "gla" else "simple_gla")
                return lambda q, k, v, g, S0: op(q, k, v, g, scale=K**-0.5, initial_state=S0,
                                                 segment_ids=seg, impl="chunk")
            return lambda q, k, v, g, S0: fn(q, k, v, g, scale=K**-0.5, initial_state=S0,
                                             segment_ids=seg, chunk_size=64, config=cfg)
        base = HopperChunkConfig(grad_programs=8, **over)
    cts = (jnp.asarray(n(B, T, H, V), bf), jnp.asarray(n(B, H, K, V)))
    return entry, base, floats, cts


def _selective_case(over, seed=0):
    from linear_jax.kernels.gpu.hopper import selective as mod
    B, T, D, N = 1, 200, 128, 16
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)         # noqa: E731
    bf = jnp.bfloat16
    floats = [jnp.asarray(n(B, T, D), bf), jnp.asarray(n(B, T, D) - 1.0, bf),
              -jnp.exp(jnp.asarray(n(D, N))), jnp.asarray(n(B, T, 1, N)),
              jnp.asarray(n(B, T, 1, N)), jnp.asarray(n(D)), jnp.asarray(n(B, T, D), bf),
              jnp.asarray(0.5 * n(D)), jnp.asarray(n(B, D, N))]
    seg = kc.segments(B, T, rng)

    def entry(cfg):
        if cfg is None:                                       # no reference wired here
            return None
        return lambda u, d, A, Bm, Cm, Dv, z, bias, h0: mod.selective_scan(
            u, d, A, Bm, Cm, Dv, z, bias, True, initial_state=h0, segment_ids=seg,
            chunk_size=64, config=cfg)
    cts = (jnp.asarray(n(B, T, D), bf), jnp.asarray(n(B, D, N)))
    return entry, HopperSelectiveConfig(**over), floats, cts


def _mlstm_case(K, over, B=1, T=256, H=2, seed=0):
    from linear_jax.kernels.gpu.hopper import mlstm as mod
    V = K
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)         # noqa: E731
    bf = jnp.bfloat16
    floats = [jnp.asarray(n(B, T, H, K), bf), jnp.asarray(n(B, T, H, K), bf),
              jnp.asarray(n(B, T, H, V), bf), jnp.asarray(n(B, T, H)),
              jnp.asarray(n(B, T, H) + 3.0)]
    seg = kc.segments(B, T, rng)

    def entry(cfg):
        if cfg is None:                                       # the float32 recurrence
            return lambda q, k, v, i, f: ops.mlstm(q, k, v, i, f, scale=K**-0.5,
                                                   segment_ids=seg, impl="recurrent")
        return lambda q, k, v, i, f: mod.mlstm(q, k, v, i, f, scale=K**-0.5, initial_state=None,
                                               segment_ids=seg, chunk_size=64, eps=1e-6,
                                               config=cfg)
    cts = (jnp.asarray(n(B, T, H, V), bf),
           (jnp.asarray(n(B, H, K, V)), jnp.asarray(n(B, H, K)), jnp.asarray(n(B, H))))
    return entry, HopperMlstmConfig(**over), floats, cts


def cases(names, shape, pieces=None, strong=False):
    """[(label, build)]: shape {"B", "T", "H"} overrides the chunk ops' and mLSTM's; pieces the
    two-level walks' of simple_gla, gla and delta (None: the device's choice); strong: the chunk
    ops' gates strong (`_chunk_case`)."""
    out = []
    for name in names:
        if name in ("simple_gla", "gla", "delta"):
            for K, V in ((64, 64), (128, 128), (128, 64), (64, 128)):
                overs = [{}]
                if name == "simple_gla":
                    overs = [dict(gates="kernel"), dict(gates="xla"), dict(grad_items="tile")]
                overs = [{**o, "pieces": pieces} for o in overs]
                for over in overs:
                    out.append((f"{name} K={K} V={V} {over} {shape}" + (" strong" * strong),
                                lambda n=name, K=K, V=V, o=over: _chunk_case(
                                    n, K, V, o, strong=strong, **shape)))
        elif name == "selective":
            out.append(("selective D=128 N=16", lambda: _selective_case(
                {}, **{k: v for k, v in shape.items() if k == "seed"})))
        elif name == "mlstm":
            for K in (64, 128):
                out.append((f"mlstm K=V={K} {shape}", lambda K=K: _mlstm_case(K, {}, **shape)))
    return out


def diff(build, *, record_interpret=False) -> dict:
    """record_interpret: record in the interpreter too (a dry run of this tool on a CPU)."""
    entry, base, floats, cts = build()
    rec = Recorder()
    cpu = jax.devices("cpu")[0]
    with rec.patched():
        f = entry(dataclasses.replace(base, interpret=record_interpret))
        out, vjp = jax.vjp(f, *floats)
        grads = vjp(jax.tree.map(lambda c, o: c.astype(o.dtype), cts, out))
        op_errors, r = None, entry(None)
        if r is not None:                                     # the op against its float32 form
            up = [x.astype(f32) for x in floats]
            out_r, vjp_r = jax.vjp(r, *up)
            grads_r = vjp_r(jax.tree.map(lambda c, o: c.astype(o.dtype), cts, out_r))
            op_errors = {f"out{i}": _rel(a, b) for i, (a, b) in enumerate(zip(
                jax.tree.leaves(out), jax.tree.leaves(out_r), strict=True))}
            op_errors.update({f"d{i}": _rel(a, b) for i, (a, b) in enumerate(zip(
                grads, grads_r, strict=True))})
        rec.mode = "replay"
        with jax.default_device(cpu):
            g = entry(dataclasses.replace(base, interpret=True))
            fl = [jax.device_put(x, cpu) for x in floats]
            out, vjp = jax.vjp(g, *fl)
            jax.block_until_ready(vjp(jax.tree.map(
                lambda c, o: jax.device_put(c, cpu).astype(o.dtype), cts, out)))
    return dict(calls=len(rec.calls), report=rec.report, op_errors=op_errors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="simple_gla,gla,delta,selective,mlstm")
    p.add_argument("--case", default="", help="only the cases whose label contains this")
    p.add_argument("--pieces", type=int, default=2, help="0: the device's choice")
    p.add_argument("--shape", default="",
                   help='e.g. "B=2,T=256,H=4,seed=1" (chunk ops and mLSTM; seed for all)')
    p.add_argument("--strong", action="store_true",
                   help="the chunk ops' log decays in [-25, -15] (strong decay)")
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--dry-run", action="store_true",
                   help="record in the interpreter too (checks this tool on a CPU: every rel 0)")
    args = p.parse_args(argv)
    rows, t_start = [], time.perf_counter()
    shape = {k: int(v) for k, v in (kv.split("=") for kv in args.shape.split(",") if kv)}
    for label, build in cases(args.ops.split(","), shape, args.pieces or None, args.strong):
        if args.case not in label:
            continue
        t0 = time.time()
        try:
            r = diff(build, record_interpret=args.dry_run)
            bad = [f"{x['kernel']}#{x['call']}[{i}] {o['rel']:.3g}" +
                   (f" nonfinite {o['gpu_nonfinite']}" if o["gpu_nonfinite"] else "") +
                   f" where {o['where']}"
                   for x in r["report"] for i, o in enumerate(x["outputs"])
                   if not o["rel"] <= args.tol or o["gpu_nonfinite"] > o["cpu_nonfinite"]]
            r.update(case=label, ok=not bad, bad=bad)
            op = r["op_errors"] and {k: float(f"{v:.3g}") for k, v in r["op_errors"].items()}
            print(f"{'PASS' if not bad else 'FAIL'} {label} ({r['calls']} calls, "
                  f"{time.time() - t0:.0f} s) {' | '.join(bad)} op vs float32: {op}", flush=True)
        except Exception as e:  # noqa: BLE001 - one case's failure is its result
            r = dict(case=label, ok=False, error=tail(e))
            print(f"ERROR {label}: {tail(e)}", flush=True)
        rows.append(r)
        kc.finish("kernel_diff", [], rows, t_start, tol=args.tol)    # saved after every case
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
