"""The benchmark scripts' shared pieces without a device: a kernel-config variant is built from a
base config and handed to the measurement (which passes it to the op as `config=`), a failure is
recorded, not raised; render.py turns a scan script's JSON (checks, timed rows, a failed variant's
row) into its README section, and picks each device's newest result file; kernel_bisect finds
every Pallas kernel of an op's programs and compiles one alone; sync_ms interleaves its calls."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import common, render
from linear_jax import ops
from linear_jax.kernels.configs import TritonChunkConfig, TritonScanConfig


def test_run_variant_passes_the_variant_config():
    base = TritonScanConfig(chunk=64, warps=4)
    assert common.run_variant(base, {"warps": 8}, lambda c: c) == (
        TritonScanConfig(chunk=64, warps=8), None)

    def fails(c):
        raise RuntimeError(f"does not compile at chunk {c.chunk}")
    result, err = common.run_variant(base, {"chunk": 128}, fails)
    assert result is None and str(err) == "does not compile at chunk 128"
    assert base == TritonScanConfig(chunk=64, warps=4)       # the base is never touched
    with pytest.raises(TypeError):  # a field the config does not have is the caller's mistake
        common.run_variant(base, {"chunk_size": 128}, lambda c: None)
    with pytest.raises(ValueError, match="block_d must be a power of two"):   # checked at once
        common.run_variant(base, {"block_d": 48}, lambda c: None)


def test_a_variant_reaches_the_kernel():
    """What the scripts do with a variant: the op runs the Triton kernel (interpret mode on a CPU)
    under the config built from the base, matching the chunk form."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 20, 48)), jnp.float32)
    g = -jnp.asarray(rng.uniform(0, 1, (2, 20, 48)), jnp.float32)
    # jitted: op by op, the interpreted kernel and the chunk form dispatch slowly
    run = lambda impl, config=None: jax.jit(
        lambda x, g: ops.hgrn(x, g, chunk_size=8, impl=impl, config=config)[0])(x, g)
    out, err = common.run_variant(TritonScanConfig.default(jax.devices()[0]),
                                  {"block_d": 16, "min_block_d": 16, "chunk": 4},
                                  lambda cfg: run("pallas:triton", (cfg,)))
    assert err is None
    np.testing.assert_allclose(out, run("chunk"), rtol=1e-5, atol=1e-5)
    _, err = common.run_variant(TritonChunkConfig(), {}, lambda cfg: run("pallas:triton", cfg))
    assert isinstance(err, ValueError) and "does not configure the triton kernel" in str(err)


def test_time_fwd_bwd_keeps_the_forward_when_the_backward_fails():
    row = {}

    def bwd():
        raise MemoryError
    with pytest.raises(MemoryError):
        common.time_fwd_bwd(row, lambda: 1, bwd, reps=1)
    assert set(row) == {"fwd_ms"}


def _mlstm_file(ok=True):
    """As mlstm_gpu.py writes it: checks, a timed row and a failed sweep variant's row."""
    shape = {"B": 8, "T": 2048, "H": 16, "K": 128, "V": 128, "dtype": "bfloat16"}
    return {"device": "NVIDIA H200", "platform": "gpu", "jax": "0.11.2", "date": "2026-12-03",
            "checks": [{"B": 2, "T": 300, "Hk": 4, "H": 4, "K": 64, "V": 64, "ref": "chunk",
                        "errors": {"h": 1e-7, "dq": 3e-6 if ok else 3e-3}, "ok": ok}],
            "check_tol": 1e-4, "quick": False, "floor": "max(bytes / bandwidth, FLOPs / rate)",
            "rows": [{"impl": "pallas", **shape, "chunk_size": 64, "fwd_floor_ms": 0.25,
                      "fwdbwd_floor_ms": 0.75, "fwd_ms": 1.0, "fwdbwd_ms": 3.0},
                     {"impl": "pallas[chunk128]", **shape, "chunk_size": 128,
                      "fwd_floor_ms": 0.5, "fwdbwd_floor_ms": 1.5,
                      "error": "ValueError: chunk 128 | 256"}] if ok else []}


def test_scan_section_of_an_mlstm_file():
    title, _, keys, script = render.SCANS[-1]
    text = "\n".join(render.scan_table(title, keys, script, "mlstm_gpu_NVIDIA_H200.json",
                                       _mlstm_file()))
    assert "## mLSTM: NVIDIA H200 (jax 0.11.2, 2026-12-03)" in text
    assert "1 of 1 checks pass" in text and "3.00e-06 (dq at B=2 T=300" in text
    assert ("| B=8 T=2048 H=16 K=128 V=128 C=64 | pallas | 1.000 | 0.250 | 4.0 | 3.000 | 0.750 "
            "| 4.0 |") in text
    assert "| pallas[chunk128] | failed: ValueError: chunk 128 / 256 | | | | | |" in text
    failed = "\n".join(render.scan_table(title, keys, script, "x.json", _mlstm_file(ok=False)))
    assert "0 of 1 checks pass" in failed and "Failed: dq at" in failed
    assert "No timings: a check failed" in failed


def test_newest_per_device_prefers_the_plain_name(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(render, "BENCH", str(tmp_path))
    for name, device in [("scans_gpu_NVIDIA_H200_run1.json", "NVIDIA H200"),
                         ("scans_gpu_NVIDIA_H200.json", "NVIDIA H200"),
                         ("scans_gpu_NVIDIA_H100_80GB_HBM3_run1.json", "NVIDIA H100 80GB HBM3"),
                         ("scans_gpu_NVIDIA_H100_80GB_HBM3_run2.json", "NVIDIA H100 80GB HBM3")]:
        (tmp_path / "results" / name).write_text(json.dumps({"device": device, "rows": []}))
    picked = [p.rsplit("/", 1)[-1] for p, _ in render.newest_per_device("scans_gpu_*.json")]
    assert picked == ["scans_gpu_NVIDIA_H100_80GB_HBM3_run2.json", "scans_gpu_NVIDIA_H200.json"]
    assert render.newest_per_device("mlstm_gpu_*.json") == []


def test_peer_checks_run_the_named_checks_on_their_inputs(monkeypatch):
    """A peer's rows come from the script's own run_check at the seeds the script gives those
    cases (100 + index), with the peer's call in place of our kernels; none without jla."""
    from experiments.benchmarks import kernel_checks as kc
    grid = [(f"case{i}", 1, 64, 1, 64, 64, "normal", False) for i in range(5)]
    seen = []

    def run_check(name, cfg, B, T, H, K, V, *, gate, extras, seed, peer):
        seen.append((name, cfg, seed, peer))
        return {"check": name, "T": T, "K": K, "ok": True}

    monkeypatch.setattr(kc, "jla_call", lambda kind, gates: None)
    assert kc.peer_checks("gla", None, grid, (1, 4), run_check) == [] and not seen
    monkeypatch.setattr(kc, "jla_call", lambda kind, gates: "peer-call")
    rows = kc.peer_checks("gla", None, grid, (1, 4), run_check)
    assert [r["check"] for r in rows] == ["jla: case1", "jla: case4"]
    assert seen == [("jla: case1", None, 101, "peer-call"), ("jla: case4", None, 104, "peer-call")]


def test_check_grid_files_merge_per_device(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(render, "BENCH", str(tmp_path))
    dev = "NVIDIA H100 80GB HBM3"
    row = lambda op, ok: {"op": op, "T": 100, "K": 64, "dtype": "float32",  # noqa: E731
                          "reference": "recurrent", "worst": 1e-7, "tol": 1e-3, "ok": ok}
    for op, bad in (("gla", 0), ("kda", 1)):
        (tmp_path / "results" / f"check_gpu_NVIDIA_H100_80GB_HBM3_grid_{op}.json").write_text(
            json.dumps({"device": dev, "jax": "0.11.2", "date": "2026-12-05", "failures": bad,
                        "rows": [row(op, not bad)]}))
    (tmp_path / "results" / "check_gpu_NVIDIA_H200_run1.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "jax": "0.11.2", "date": "2026-12-03", "failures": 0,
         "rows": [row("gla", True)]}))
    files = render.check_files()
    assert [p.rsplit("/", 1)[-1] for p, _ in files] == [
        "check_gpu_NVIDIA_H100_80GB_HBM3_grid_*.json", "check_gpu_NVIDIA_H200_run1.json"]
    merged = files[0][1]
    assert sorted(r["op"] for r in merged["rows"]) == ["gla", "kda"] and merged["failures"] == 1
    # a Hopper file of checks alone renders its checks and no empty timing table
    text = "\n".join(render.hopper_table("x_checks.json", {
        "device": dev, "jax": "0.11.2", "date": "2026-12-05", "rows": [],
        "checks": [{"check": "strong", "T": 2048, "ok": True}],
        "peer_checks": [{"check": "jla: strong", "T": 2048, "ok": False,
                         "errors": {"o": 2e-3, "dg": 0.7}}]}, "gla"))
    assert "1 of 1 pass" in text and "checks-only" in text and "| op |" not in text
    assert "jla: strong T=2048: dg 7.0e-01." in text


def test_render_rewrites_only_the_marked_readme_block(tmp_path):
    """The root README's generated table: the lines between its marks are replaced, the rest
    kept; a README without the marks is left alone."""
    from experiments.benchmarks import render
    begin, end = (render.README_MARK.format(f"{w} hopper:") for w in ("begin", "end"))
    path = tmp_path / "README.md"
    path.write_text(f"intro\n{begin}\nold row\n{end}\noutro\n")
    assert render.update_readme(str(path), "hopper", ["| new |"])
    assert path.read_text() == f"intro\n{begin}\n| new |\n{end}\noutro\n"
    path.write_text("no marks\n")
    assert not render.update_readme(str(path), "hopper", ["| new |"])
    assert path.read_text() == "no marks\n"
    rows = render.hopper_rows({"rows": [
        {"T": 2048, "B": 8, "fwd_ms": 0.1, "fwd_sync_ms": 0.2, "jla_fwd_ms": 0.3},
        {"T": 2048, "B": 8, "delta_rule.fwd_ms": 0.5, "delta_rule.fwd_sync_ms": 0.6,
         "delta_rule.jla_fwd_ms": 0.4}]})
    assert [(r["op"], r["fwd_sync"], r["fwd_jla"]) for r in rows] == [
        ("simple_gla", 0.2, 0.3), ("delta_rule", 0.6, 0.4)]


def test_readme_rows_follow_todays_default_config():
    """A timing row counts as today's default by its file's config and its variant's overrides,
    not by its label: the "default" row of a file timed under an older default names the field it
    ran under, and a named variant that is today's default is taken for the cell."""
    import dataclasses

    from linear_jax.kernels.configs import HopperChunkConfig, HopperDeltaConfig
    gla_then = dataclasses.asdict(dataclasses.replace(HopperChunkConfig(), grad_programs=132,
                                                      gla_grad_key_blocks=False))
    data = {"config": gla_then}
    assert render.config_changes(data, "default") == {"gla_grad_key_blocks": False}
    assert render.config_changes(data, "gla_grad_key_blocks") == {}
    assert render.config_changes(data, "unknown") is None
    delta = {"config": dataclasses.asdict(HopperDeltaConfig(programs=132))}
    assert render.config_changes(delta, "default") == {}
    assert render.config_changes({}, "default") == {}          # an older file: no config kept


@pytest.mark.smoke
def test_compile_time_script_runs(tmp_path, monkeypatch):
    """experiments/benchmarks/compile_time.py end to end at a tiny size: the scanned and the
    unrolled train step of a 2-layer GLA model lower and compile, the JSON names the device, the
    jax version, the shapes and the seconds, and the scan lowers to fewer ops than the unrolled
    stack."""
    from experiments.benchmarks import compile_time

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    assert compile_time.main(["--quick", "--layers", "2", "--mixers", "gla", "--unrolled",
                              "--out", "ct.json"]) == 0
    out = json.loads((tmp_path / "ct.json").read_text())
    assert out["device"] and out["jax"] == jax.__version__
    rows = {(r["mixer"], r["form"]): r for r in out["rows"]}
    assert set(rows) == {("gla", "scan"), ("gla", "unrolled")}
    for r in rows.values():
        assert r["layers"] == 2 and r["d_model"] == 64 and r["seq_len"] == 128
        assert r["lower_s"] > 0 and r["compile_s"] > 0
    assert rows["gla", "scan"]["hlo_ops"] < rows["gla", "unrolled"]["hlo_ops"]


def test_kernel_diff_locates_a_difference_and_builds_its_cases():
    """kernel_diff's report names the batch row, chunk, head and key block that differ, and every
    case it offers builds inputs of the shape asked (the device run is where it runs)."""
    from experiments.benchmarks import kernel_diff

    a = np.ones((2, 256, 2, 128))
    b = a.copy()
    b[1, 64:128, 0, 64:] = 3.0
    where = kernel_diff._where(b, a)
    assert [e > 0 for e in where["axis0"]] == [False, True]
    assert [e > 0 for e in where["axis1"]] == [False, True, False, False]
    assert [e > 0 for e in where["axis2"]] == [True, False]
    assert [e > 0 for e in where["axis3"]] == [False, True]
    assert [[e > 0 for e in r] for r in where["cell"]] == [[False] * 4, [False, True, False, False]]
    b = a.copy()
    b[:, 8:16, :, 3] = 3.0                                   # chunk rows 8..15, column 3 of block 0
    where = kernel_diff._where(b, a)
    assert [e > 0 for e in where["row8"]] == [j == 1 for j in range(8)]
    assert all(e > 0 for e in where["rowmod8"])
    assert [e > 0 for e in where["col8"]] == [j == 0 for j in range(8)]
    labels = [label for label, _ in kernel_diff.cases(
        ["simple_gla", "gla", "delta", "selective", "mlstm"], {"B": 2, "T": 128, "H": 1}, None)]
    # simple_gla: 3 configs, gla and delta: 1, each at 4 (K, V) pairs
    assert len(labels) == len(set(labels)) == 3 * 4 + 4 + 4 + 1 + 2
    _, build = kernel_diff.cases(["gla"], {"B": 2, "T": 128, "H": 1}, None)[1]
    _, _, floats, _ = build()
    assert floats[0].shape == (2, 128, 1, 128) and floats[3].shape == (2, 128, 1, 128)


def test_kernel_bisect_finds_and_compiles_every_kernel_of_kda():
    """kernel_bisect collects the Pallas calls of KDA's primal and gradient (through the op's jit
    and custom VJP) by the kernels' names, and compiles one alone (interpret mode on the CPU)."""
    from experiments.benchmarks import kernel_bisect

    progs = kernel_bisect.programs("kda", 1, 64, 1, 64, jnp.float32)
    names = {p: [kernel_bisect.kernel_name(e).split(" at ")[0]
                 for e in kernel_bisect.pallas_calls(j)] for p, j in progs.items()}
    assert "delta_ut_inverse" in names["primal"]
    assert {"delta_state_bwd", "delta_backward_states", "delta_backward_wy"} <= set(
        names["grad"])
    eqn = next(e for e in kernel_bisect.pallas_calls(progs["grad"])
               if "delta_state_bwd" in kernel_bisect.kernel_name(e))
    kernel_bisect.compile_alone(eqn)


def test_kernel_bisect_calls_a_delta_kernel_past_the_registry():
    """--kernel calls a delta-rule op's Triton kernels directly, past the registry's choice:
    gated_delta_rule at K = 256, V = 512 (the Gated DeltaNet layer's heads at d_model 512), which
    the registry declines, yields their programs to bisect, on values 512 wide."""
    from experiments.benchmarks import kernel_bisect

    progs = kernel_bisect.programs("gated_delta_rule", 1, 32, 1, 256, jnp.bfloat16,
                                   kernel="triton", V=512)
    calls = kernel_bisect.pallas_calls(progs["grad"])
    names = {kernel_bisect.kernel_name(e).split(" at ")[0] for e in calls}
    assert {"delta_backward_states", "delta_backward_wy"} <= names
    assert any(v.aval.shape[-1] == 512 for e in calls for v in e.invars)
    with pytest.raises(ValueError, match="delta-rule ops"):
        kernel_bisect.programs("gla", 1, 32, 1, 64, jnp.bfloat16, kernel="triton")


def test_sync_ms_interleaves_the_functions():
    """common.sync_ms calls the functions in turn, rep by rep, and gives one median each."""
    calls = []
    fns = [lambda x, i=i: calls.append(i) or x for i in range(3)]
    out = common.sync_ms(fns, jnp.ones(()), reps=4, warmup=0)
    assert len(out) == 3 and all(t >= 0 for t in out)
    assert calls == [0, 1, 2] * 4


def test_kernel_report_reads_stage_times_and_resources(tmp_path):
    from experiments.benchmarks import kernel_report as kr

    # two warpgroups of one kernel: "mm" nested in a chunk, "wait" beside it
    ev = lambda name, ph, ts, tid: {"name": name, "ph": ph, "ts": ts, "pid": 1, "tid": tid}
    events = [ev("wait", "B", 0.0, 1), ev("wait", "E", 1.0, 1), ev("mm", "B", 1.0, 1),
              ev("mm", "E", 4.0, 1), ev("wait", "B", 4.0, 1), ev("wait", "E", 5.0, 1),
              ev("mm", "B", 0.0, 2), ev("mm", "E", 2.0, 2)]
    path = tmp_path / "1-trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    st = kr.stage_times([str(path)])
    assert st["wait"]["ranges_per_wg"] == 2 and st["wait"]["warpgroups"] == 1
    assert st["wait"]["mean_us"] == pytest.approx(1.0)
    assert st["mm"]["mean_us"] == pytest.approx(2.5)          # 3 us and 2 us
    assert st["mm"]["share"] == pytest.approx((3 / 5 + 2 / 2) / 2)
    assert st["_span_us_per_wg"] == pytest.approx((5 + 2) / 2)
    # the ptxas log and SASS of one module
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "delta_walk_0.ptxas").write_text(
        "ptxas info    : Used 168 registers, 0 bytes stack frame\n"
        "    8 bytes spill stores, 16 bytes spill loads\n")
    (tmp_path / "d" / "delta_walk_0.sass").write_text(
        "        /*0090*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;\n"
        "        /*00a0*/              @!P0 MUFU.EX2 R3, R2 ;\n"
        "        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;\n")
    res = kr.resources(str(tmp_path / "d"), keep=str(tmp_path / "keep"))
    r = res["delta_walk_0"]
    assert (r["registers"], r["spill_store_bytes"], r["spill_load_bytes"]) == (168, 8, 16)
    assert r["sass"] == {"HGMMA": 2, "MUFU": 1} and r["sass_total"] == 3
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == [
        "delta_walk_0.ptxas.gz", "delta_walk_0.sass.gz"]


def test_newest_day_keeps_one_session_and_lends_its_config(monkeypatch):
    """The Hopper sections read each device's newest day of files: an older day's file drops
    out, and a file cut at its time limit (no config) takes the config of its day's others."""
    files = [("a.json", {"device": "X", "date": "2026-12-05", "config": {"c": 1}}),
             ("b.json", {"device": "X", "date": "2026-12-05"}),
             ("c.json", {"device": "X", "date": "2026-12-04", "config": {"c": 0}}),
             ("d.json", {"device": "Y", "date": "2026-12-01"})]
    monkeypatch.setattr(render, "newest", lambda pattern: files)
    out = dict(render.newest_day("*"))
    assert sorted(out) == ["a.json", "b.json", "d.json"]
    assert out["b.json"]["config"] == {"c": 1} and "config" not in out["d.json"]


def test_hopper_ssm_ratios_memory_and_readme_cut():
    """hopper_ssm_gpu's rows: jla's sync ms of the same run over ours, each fwd+bwd's planned
    peak over the chunk form's (`--memory`); render's README cut keeps, per shape, our fastest
    forward and fastest fwd+bwd (device ms) with that run's jla row, the full table every row."""
    from experiments.benchmarks import hopper_ssm_gpu as h

    ms = lambda f, fs, b, bs: {"fwd_ms": f, "fwd_sync_ms": fs,               # noqa: E731
                               "fwdbwd_ms": b, "fwdbwd_sync_ms": bs}
    rows = {"mosaic_gpu[a]": {**ms(1.0, 2.0, 3.0, 4.0), "fwdbwd_mem_bytes": 50},
            "mosaic_gpu[b]": ms(0.5, 1.0, 5.0, 6.0), "jla_run": ms(0.8, 1.0, 2.0, 3.0),
            "chunk_memory": {"fwdbwd_mem_bytes": 200}}
    h.add_ratios(rows, {"fwd_ms": 9.0})                   # the same run's jla wins over an anchor
    a, b = rows["mosaic_gpu[a]"], rows["mosaic_gpu[b]"]
    assert (a["fwd_jla_over_ours"], a["fwdbwd_jla_over_ours"]) == (0.5, 0.75)
    assert (b["fwd_jla_over_ours"], b["fwdbwd_jla_over_ours"]) == (1.0, 0.5)
    assert a["fwdbwd_mem_over_chunk"] == 0.25 and "fwdbwd_mem_over_chunk" not in b
    assert "fwd_jla_over_ours" not in rows["jla_run"]
    data = {"device": "H", "rows": [{"timings": {"sel": {"jla": {}, **rows}}}]}
    every = render.ssm_rows([("f.json", data)])
    best = render.ssm_best(every)
    kept = [r["kernel"] for r in best]
    assert kept == ["mosaic_gpu[b]", "jla_run", "mosaic_gpu[a]"]     # fwd's best, then fwd+bwd's
    table = render.ssm_table(best)
    assert "| sel | mosaic_gpu[a] | 1.000 / 2.000 (0.50x) | 3.000 / 4.000 (0.75x) |" in table[4]
    assert len(render.ssm_table(every)) == 2 + 3                     # chunk_memory: no timing row


def test_vmap_check_compares_auto_with_the_chunk_form_and_can_fail(tmp_path, monkeypatch):
    """On a CPU "auto" is the chunk form: every row passes; an "auto" that computes something
    else (a scaled output) fails its row."""
    from experiments.benchmarks import common, vmap_gpu

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    argv = ["--ops", "gla", "--widths", "16", "--members", "2", "--B", "1", "--T", "70",
            "--reps", "1"]
    rows = vmap_gpu.main(argv)
    assert [(r["op"], r["auto"], r["ok"]) for r in rows] == [("gla", "chunk", True)]
    assert max(rows[0]["errors"]["auto"].values()) < 2e-2
    (ssd,) = vmap_gpu.main(["--ops", "ssd", *argv[2:]])      # Mamba-2's own shapes: N 16, P 2K
    assert (ssd["ok"], ssd["K"], ssd["V"]) == (True, 16, 16)
    call = vmap_gpu.call

    def wrong(op, impl):
        f = call(op, impl)
        return (lambda x: jax.tree.map(lambda a: 1.1 * a, f(x))) if impl == "auto" else f

    monkeypatch.setattr(vmap_gpu, "call", wrong)
    rows = vmap_gpu.main(argv)
    assert [r["ok"] for r in rows] == [False] and rows[0]["errors"]["auto"]["o"] > 0.05
    assert (tmp_path / "vmap_cpu.json").exists()


def test_kernel_smem_captures_each_kernel_and_its_stages():
    """kernel_smem lowers each Triton kernel of an op to Triton IR on the CPU, with the warps and
    stages it was given: the delta passes and every one-pass forward (gla's too) go unpipelined
    (1 stage) past K = 128, where two stages asked more shared memory than an H100 has, and keep
    the configured stages up to 128; the decay family's state passes keep theirs at 256."""
    from experiments.benchmarks import kernel_smem

    def stages(op, D):
        rows = kernel_smem.kernels(op, 1, 32, 1, D, jnp.float32)
        assert all(r["ttir"].startswith("module") and "tt.func" in r["ttir"] for r in rows)
        return {r["kernel"]: r["num_stages"] for r in rows}

    cfg = TritonChunkConfig()
    assert min(cfg.stages_state, cfg.stages_fused) > 1
    wide, narrow = stages("gated_delta_rule", 256), stages("gated_delta_rule", 64)
    passes = ("delta_state_fwd", "delta_state_bwd", "gated_delta_fused_fwd")
    assert {*passes, "delta_backward_wy"} <= set(wide)
    assert [wide[p] for p in passes] == [1, 1, 1]
    assert [narrow[p] for p in passes] == [cfg.stages_state] * 2 + [cfg.stages_fused]
    wide, narrow = stages("gla", 256), stages("gla", 64)
    passes = ("vector_fused_fwd", "decay_state_fwd", "decay_state_bwd")
    assert [wide[p] for p in passes] == [1, cfg.stages_state, cfg.stages_state]
    assert [narrow[p] for p in passes] == [cfg.stages_fused] + [cfg.stages_state] * 2


def test_check_gpu_cases_split_by_length_and_dtype():
    """check_gpu's grid, cut by --lengths and --dtypes so that one process per case can run."""
    from experiments.benchmarks import check_gpu

    full = check_gpu.cases([256], ["float32", "bfloat16"], [100, 2048, 8192])
    assert full == [(100, 256, "float32"), (2048, 256, "float32"), (8192, 256, "float32"),
                    (2048, 256, "bfloat16")]
    assert check_gpu.cases([256], ["bfloat16"], [100, 2048, 8192]) == [(2048, 256, "bfloat16")]
    assert check_gpu.cases([256], ["float32", "bfloat16"], [8192]) == [(8192, 256, "float32")]
    assert check_gpu.cases([64, 128], ["float32"], [100]) == [(100, 64, "float32"),
                                                              (100, 128, "float32")]
    assert check_gpu.op_cases("gla", full) == full
    assert check_gpu.op_cases("linear_attention", full) == [full[0], full[-1]]
    one = check_gpu.cases([256], ["float32"], [2048])
    assert check_gpu.op_cases("linear_attention", one) == one   # once, not twice


def test_normaliser_benchmark_runs_and_its_check_can_fail(monkeypatch):
    """--quick on the CPU: split and column_f32 agree with column and every form is timed; a
    split form that computes something else (a scaled output) fails the check and the script
    exits 1."""
    from experiments.benchmarks import normaliser_gpu as nb

    assert nb.main(["--quick", "--shapes", "tiny"]) == 0
    run = nb.run

    def wrong(form, x, seg):
        o, S = run(form, x, seg)
        return (1.01 * o, S) if form == "split" else (o, S)

    monkeypatch.setattr(nb, "run", wrong)
    assert nb.main(["--quick", "--shapes", "tiny"]) == 1


def test_f32_dots_benchmark_runs_and_its_check_can_fail(monkeypatch, tmp_path):
    """--quick on the CPU (interpret mode computes 3xTF32 as IEEE float32): both kernel forms
    agree with the chunk form and every form is timed; a tf32x3 form that computes something
    else (a scaled output) fails the check and the script exits 1."""
    from experiments.benchmarks import common
    from experiments.benchmarks import f32_dots_gpu as fd

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    assert fd.main(["--quick", "--ops", "delta_rule"]) == 0
    rows = json.loads(next(tmp_path.glob("f32_dots_*.json")).read_text())["rows"]
    assert {f"{f}_fwdbwd_ms" for f in fd.FORMS} <= set(rows[0]) and rows[0]["ok"]
    call = fd.call

    def wrong(op, form, quick=False):
        f = call(op, form, quick)
        return (lambda x: (lambda o, S: (1.01 * o, S))(*f(x))) if form == "tf32x3" else f

    monkeypatch.setattr(fd, "call", wrong)
    assert fd.main(["--quick", "--ops", "delta_rule"]) == 1


def test_mlstm_check_under_named_float32_products(monkeypatch, tmp_path):
    """mlstm_gpu --f32-dots: the check alone, of the Triton kernel under that config (interpret
    mode on the CPU), tagged in its file name and JSON, no timings; a kernel that computes
    something else fails it and the script exits 1."""
    from experiments.benchmarks import common
    from experiments.benchmarks import mlstm_gpu as mg

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    seen, op = [], mg.mlstm

    def spy(*args, impl, config=None, **kw):
        seen.append((impl, getattr(config, "f32_dots", None)))
        h, state = op(*args, impl=impl, config=config, **kw)
        return (1.01 * h if impl == "pallas:triton" and wrong else h), state

    wrong = False
    monkeypatch.setattr(mg, "mlstm", spy)
    assert mg.main(["--quick", "--f32-dots", "tf32x3"]) == 0
    out = json.loads((tmp_path / f"mlstm_gpu_{jax.devices()[0].device_kind}_tf32x3.json"
                      .replace(" ", "_")).read_text())
    assert out["f32_dots"] == "tf32x3" and out["rows"] == []
    assert out["checks"] and all(r["ok"] for r in out["checks"])
    assert ("pallas:triton", "tf32x3") in seen and ("chunk", None) in seen
    wrong = True
    assert mg.main(["--quick", "--f32-dots", "tf32x3"]) == 1
