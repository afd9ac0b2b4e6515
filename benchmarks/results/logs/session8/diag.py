"""One-off device diagnosis: which config / shape makes the Hopper simple_gla / gla kernels fail."""
import dataclasses, sys, time, json
import jax
from linear_jax.kernels.configs import HopperChunkConfig
which = sys.argv[1]
if which == "sgla":
    from experiments.benchmarks.hopper_gpu import run_check
else:
    from experiments.benchmarks.hopper_gla_gpu import run_check
A = (2, 2048, 4, 128, 128, True); Bk = (2, 2048, 4, 64, 64, True); Ct = (2, 256, 2, 128, 128, True)
D = (2, 2048, 4, 128, 128, False); E = (2, 256, 2, 64, 64, True)
base = HopperChunkConfig.default(jax.devices()[0])
X = dict(gates="xla"); P1 = dict(pieces=1)
plan = [({}, A), ({}, Bk), ({}, Ct), ({}, E), ({}, D), (X, A), (P1, A), (P1, Ct), ({**X, **P1}, A),
        (dict(pieces=1, gates="xla", grad_items="tile"), A), (dict(overlap=False), A),
        (dict(stages=3, stages_grad=1), A), (dict(semantics="warpgroup"), A)]
plan = [(o, sh, "normal") for o, sh in plan]
if which == "sgla":
    plan += [(X, Bk, "normal"), (X, (1, 8192, 4, 128, 128, True), "normal"), (X, A, "strong"),
             (X, (2, 100, 2, 64, 64, True), "normal"), ({}, (1, 32768, 2, 128, 128, True), "normal")]
else:
    plan += [(X, Bk, "normal"), (X, A, "strong")]
if which == "gla":
    plan = [p for p in plan if "grad_items" not in p[0]]
plan.sort(key=lambda p: p[0] != X)   # the candidate default first
out = []
for i, (over, (B, T, H, K, V, ex), gate) in enumerate(plan):
    t0 = time.time()
    try:
        r = run_check("diag", dataclasses.replace(base, **over), B, T, H, K, V, gate=gate,
                      extras=ex, seed=7)
        res = {k: r["errors"][k] for k in r["errors"]}
        ok = r["ok"]
    except Exception as e:  # noqa: BLE001
        res, ok = repr(e)[-300:], False
    out.append(dict(over=over, shape=(B, T, H, K, V, ex), gate=gate, ok=ok, res=res))
    print(which, "PASS" if ok else "FAIL", over, (B, T, H, K, V, ex), gate, res, f"{time.time()-t0:.0f}s", flush=True)
json.dump(out, open(f"/tmp/logs/diag_{which}.json", "w"), indent=1, default=str)
