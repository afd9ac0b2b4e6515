"""experiments/paper_protocols.py: every cell of every protocol is a model that builds, and each
protocol runs its smoke cell (--quick) end to end into its JSON and table; a second call reuses
the finished cell, and --collect rebuilds the summary from it."""

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
from flax import nnx

from experiments import paper_protocols
from linear_jax.training import data, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_cell_of_every_protocol_builds():
    built = set()
    for name in sorted(paper_protocols.PROTOCOLS):
        args = paper_protocols.parse_args([f"--protocol={name}", "--out=/unused"])
        module = paper_protocols.importlib.import_module(
            f"experiments.configs.{paper_protocols.PROTOCOLS[name]['config']}")
        grid = paper_protocols.cell_configs(args, module, paper_protocols.PROTOCOLS[name])
        assert len(grid) == len(module.CELLS) * len(getattr(module, "LRS", (None,)))
        for _, _, config in grid:
            assert config.seeds == (0, 1, 2)
            vocab = data.make_source(config.task, split="train", batch_size=1,
                                     seed=0).vocab_size
            model = config.model.to_dict()
            key = json.dumps({**model, "d_model": None, "vocab": vocab}, sort_keys=True)
            if key not in built:                 # each distinct model once, at its width
                built.add(key)
                nnx.eval_shape(loop.build_model(config.model, vocab, seed=0))


@pytest.mark.smoke
@pytest.mark.parametrize("name", sorted(paper_protocols.PROTOCOLS))
def test_quick_protocol_writes_json_and_table(tmp_path, capsys, name):
    argv = [f"--protocol={name}", "--quick", f"--out={tmp_path}"]
    summary = paper_protocols.main(argv)
    saved = json.loads((tmp_path / name / f"{name}.json").read_text())
    (cell,) = saved["cells"]
    assert cell["cell"] == paper_protocols.PROTOCOLS[name]["quick_cell"]
    assert cell["seeds"] == [0, 1] and cell["steps"] == 2
    first = paper_protocols.PROTOCOLS[name]["columns"][0][0]
    mean, std, best = cell[first]
    assert mean is not None and std >= 0 and best >= mean - 1e-12
    table = (tmp_path / name / f"{name}.md").read_text()
    assert f"| {cell['cell']} |" in table and "±" in table
    result = json.loads((tmp_path / name / cell["workdir"].split("/")[-1] / "result.json")
                        .read_text())
    assert len(result["per_seed"]) == 2
    assert "[1/1]" in capsys.readouterr().out
    if paper_protocols.PROTOCOLS[name].get("plot"):
        assert (tmp_path / name / f"{name}_T{result['config']['task']['seq_len']}.png").exists()
    if paper_protocols.PROTOCOLS[name].get("curves"):
        task, _, rest = cell["cell"].partition("-")
        assert (tmp_path / name / f"{task if rest else name}_curves.png").exists()
    assert paper_protocols.main(argv)["runs"][0]["steps"] == summary["runs"][0]["steps"]
    (tmp_path / name / f"{name}.json").unlink()
    collected = paper_protocols.main(argv + ["--collect"])
    assert collected["cells"] == summary["cells"] and (tmp_path / name / f"{name}.json").exists()


def test_collect_trains_nothing(tmp_path, monkeypatch):
    """--collect summarises finished cells only: with none finished it stops before training."""
    monkeypatch.setattr(paper_protocols, "run_cell", lambda config: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="no finished cell of mqar"):
        paper_protocols.main(["--protocol=mqar", "--collect", "--cells=gla-d64-T256",
                              f"--out={tmp_path}"])
    assert not (tmp_path / "mqar").exists()


def test_set_overrides_every_cell():
    args = paper_protocols.parse_args(["--protocol=mqar", "--cells=gla-d64-T256",
                                       "--set=model.impl=chunk", "--set=eval.batch_size=8",
                                       "--steps=7", "--out=/unused"])
    module = paper_protocols.importlib.import_module("experiments.configs.paper_mqar")
    grid = paper_protocols.cell_configs(args, module, paper_protocols.PROTOCOLS["mqar"])
    assert [lr for _, lr, _ in grid] == list(module.LRS)
    for _, lr, c in grid:
        assert (c.model.impl, c.eval.batch_size, c.train.steps, c.train.lr) == ("chunk", 8, 7, lr)
    with pytest.raises(SystemExit):
        paper_protocols.parse_args(["--protocol=mqar", "--set=nonsense"])


def test_a_caret_anchors_a_cell_pattern_at_the_start():
    module = paper_protocols.importlib.import_module("experiments.configs.paper_mqar")

    def cells(pattern):
        args = paper_protocols.parse_args(["--protocol=mqar", f"--cells={pattern}"])
        grid = paper_protocols.cell_configs(args, module, paper_protocols.PROTOCOLS["mqar"])
        return list(dict.fromkeys(cell for cell, _, _ in grid))

    assert set(cells("attention-d64-T256")) == {"attention-d64-T256", "linear_attention-d64-T256"}
    assert cells("^attention-d64-T256") == ["attention-d64-T256"]
    assert cells("^attention-d6,^gla-d128-T512") == ["attention-d64-T256", "attention-d64-T512",
                                                     "gla-d128-T512"]


def test_state_tracking_eigenvalue_ranges_reach_the_layers():
    from experiments.configs import paper_state_tracking as st

    for model in ("deltanet_01", "deltanet_11", "mamba_01", "mamba_11"):
        c = st.get_config(f"parity-{model}")
        mixer = nnx.eval_shape(loop.build_model(c.model, 3, seed=0)).layer_mixer(0)
        extended = model.endswith("_11")
        if model.startswith("mamba"):
            assert mixer.allow_neg_eigval == extended
        else:
            assert mixer.beta_max == (2.0 if extended else 1.0)


@pytest.mark.parametrize("out, steps, n", [("", 5000, 18), ("parity_20k", 20000, 3),
                                           ("authors_training", None, 7)])
def test_the_committed_state_tracking_runs_collect_under_their_settings(out, steps, n):
    """The config's defaults are the authors' training, whose runs collect as they are; the runs
    made before it (the library's AdamW) are still the committed runs of their configs: `EARLIER`
    and --steps as overrides name each of them (finished or cut), and the defaults none."""
    from experiments.configs import paper_state_tracking as st

    root = ROOT / "experiments" / "results" / "protocols" / out
    base = [f"--out={root}", "--protocol=state_tracking", "--collect", "--set=model.impl=chunk"]
    earlier = [f"--set={k}={v}" for k, v in st.EARLIER.items()] + [f"--steps={steps}"]
    cases = ((earlier, n), ([], 0)) if steps else (([], n), (earlier[:-1], 0))
    for flags, want in cases:
        args = paper_protocols.parse_args(base + flags)
        grid = paper_protocols.cell_configs(args, st, paper_protocols.PROTOCOLS["state_tracking"])
        assert sum(paper_protocols.saved(c) is not None for _, _, c in grid) == want, flags


def test_deltaproduct_householder_steps_reach_the_layer():
    from experiments.configs import paper_deltaproduct as dp

    for cell in dp.CELLS:
        c = dp.get_config(cell)
        vocab = data.make_source(c.task, split="train", batch_size=1, seed=0).vocab_size
        mixer = nnx.eval_shape(loop.build_model(c.model, vocab, seed=0)).layer_mixer(0)
        assert mixer.steps == int(cell.split("-nh")[1]) and mixer.beta_max == 2.0
        assert vocab == {"s3": 7, "s5": 121}[c.task.name] and c.model.num_layers == 1
    with pytest.raises(ValueError, match="not one of"):
        dp.get_config("s4-nh2")


@pytest.mark.smoke
def test_a_rate_set_on_the_command_line_is_the_rate_the_table_names(tmp_path):
    """Without a sweep the row's lr is the config's, so a `--set=train.lr=...` run says so."""
    argv = ["--protocol=icl_regression", "--quick", f"--out={tmp_path}", "--set=train.lr=0.0042"]
    (row,) = paper_protocols.main(argv)["cells"]
    assert row["lr"] == pytest.approx(0.0042)
    assert "| 0.0042 |" in (tmp_path / "icl_regression" / "icl_regression.md").read_text()


@pytest.mark.smoke
def test_a_cells_learning_rates_train_together_and_are_reused(tmp_path):
    args = paper_protocols.parse_args(["--protocol=mqar", "--quick", f"--out={tmp_path}"])
    module = paper_protocols.importlib.import_module("experiments.configs.paper_mqar")
    protocol = paper_protocols.PROTOCOLS["mqar"]
    ((_, lr, first),) = paper_protocols.cell_configs(args, module, protocol)
    second = first.copy_and_resolve_references()
    second.train.lr, second.workdir = 3 * lr, first.workdir + "_x3"
    runs = paper_protocols.run_cell([first, second])
    assert [reused for _, reused in runs] == [False, False]
    assert [r["config"]["train"]["lr"] for r, _ in runs] == [lr, 3 * lr]
    assert runs[0][0]["eval"]["eval"]["loss"] != runs[1][0]["eval"]["eval"]["loss"]
    again = paper_protocols.run_cell([first, second])
    assert [reused for _, reused in again] == [True, True]
    assert [r for r, _ in again] == [r for r, _ in runs]


def test_a_deadline_before_the_first_evaluation_still_leaves_one(tmp_path):
    """A cell too slow to reach its first scheduled evaluation before the deadline (session 33:
    Based d512 at ~5 s a step, evaluations every 500 steps, killed with nothing) evaluates at the
    last step it can instead, once a step's time is known (after step 2; step 1 compiles)."""
    argv = ["--protocol=mqar", "--quick", f"--out={tmp_path}", "--steps=6",
            "--set=eval.every=6", "--deadline=0"]
    (row,) = paper_protocols.main(argv)["cells"]
    assert row["partial"] and (row["steps"], row["of"]) == (3, 6)
    assert row["stopped"] == "deadline: cut at step 3 of 6"
    workdir = tmp_path / "mqar" / row["workdir"].split("/")[-1]
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval" and r["seed"] == "mean"] == [3]


def test_a_deadline_leaves_a_cut_run_that_is_trained_again(tmp_path):
    """--deadline stops at the last evaluation before it: the run goes to partial.json (marked in
    the table), is not reused as finished, and a later call trains it to its end; --salvage
    rebuilds a killed run's partial.json from its metrics."""
    argv = ["--protocol=mqar", "--quick", f"--out={tmp_path}", "--steps=4",
            "--set=eval.every=2"]
    cut = paper_protocols.main(argv + ["--deadline=0"])
    (row,) = cut["cells"]
    assert row["partial"] and (row["steps"], row["of"]) == (2, 4)
    assert row["stopped"] == "deadline: cut at step 2 of 4"
    workdir = tmp_path / "mqar" / row["workdir"].split("/")[-1]
    assert (workdir / "partial.json").exists() and not (workdir / "result.json").exists()
    assert "| 2 of 4, cut |" in (tmp_path / "mqar" / "mqar.md").read_text()
    assert paper_protocols.main(argv + ["--collect"])["cells"] == cut["cells"]
    full = paper_protocols.main(argv)
    (row,) = full["cells"]
    assert not row["partial"] and row["steps"] == 4 and row["stopped"] is None
    assert (workdir / "result.json").exists() and not (workdir / "partial.json").exists()

    # a run killed before it could write either file (a lent machine taken back) is rebuilt
    # from its metrics.jsonl by --salvage, at the last step where every seed was evaluated
    where = "--salvage=Some GPU,tensorfloat32"
    with pytest.raises(SystemExit):
        paper_protocols.main(argv + [where])                        # only with --collect
    ((_, _, config),) = paper_protocols.cell_configs(
        paper_protocols.parse_args(argv), paper_protocols.importlib.import_module(
            "experiments.configs.paper_mqar"), paper_protocols.PROTOCOLS["mqar"])
    assert paper_protocols.salvage(config, {}) is None             # it finished
    (workdir / "result.json").unlink()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    at = lambda step, seed: next(r for r in records if r["step"] == step and r["split"] == "eval"
                                 and r["seed"] == seed)
    (workdir / "metrics.jsonl").write_text("\n".join(
        x for x, r in zip(lines, records, strict=True)
        if (r["step"], r["split"], r["seed"]) != (4, "eval", 1)) + "\n")
    lost = paper_protocols.main(argv + ["--collect", where])
    (row,) = lost["cells"]
    assert row["partial"] and row["lost"] and row["steps"] == 2 and row["seconds"] is None
    assert row["params"] == full["cells"][0]["params"]
    assert (row["device"], row["matmul_precision"]) == ("Some GPU", "tensorfloat32")
    assert row["accuracy"][0] == at(2, "mean")["accuracy"]
    result = json.loads((workdir / "partial.json").read_text())
    assert result["config"] == json.loads((workdir / "config.json").read_text())  # the run's own
    assert [r["eval"]["eval"]["loss"] for r in result["per_seed"]] == [
        at(2, 0)["loss"], at(2, 1)["loss"]]
    assert "| 2 of 4, lost | — |" in (tmp_path / "mqar" / "mqar.md").read_text()
    assert paper_protocols.salvage(config, {}) is None             # partial.json got as far
    (workdir / "partial.json").unlink()
    stored = json.loads((workdir / "config.json").read_text())
    stored["train"]["lr"] *= 2
    (workdir / "config.json").write_text(json.dumps(stored))
    assert paper_protocols.salvage(config, {}) is None             # another config's metrics


def test_lrs_trains_a_subset_of_the_sweep_under_the_sweeps_names():
    module = paper_protocols.importlib.import_module("experiments.configs.paper_mqar")
    args = paper_protocols.parse_args(["--protocol=mqar", "--cells=^gla-d64-T256",
                                       f"--lrs={module.LRS[2]}", "--out=/o"])
    ((cell, lr, config),) = paper_protocols.cell_configs(args, module,
                                                        paper_protocols.PROTOCOLS["mqar"])
    assert lr == module.LRS[2] and config.workdir == f"/o/mqar/gla-d64-T256_lr{lr:g}"
    args = paper_protocols.parse_args(["--protocol=mqar", "--lrs=0.5", "--out=/o"])
    with pytest.raises(SystemExit, match="--lrs"):
        paper_protocols.cell_configs(args, module, paper_protocols.PROTOCOLS["mqar"])


def test_cost_compiles_every_cell_and_trains_nothing(tmp_path):
    out = paper_protocols.main(["--protocol=mqar", "--quick", "--cost", f"--out={tmp_path}"])
    (row,) = out["cells"]
    assert row["flops"] > 0 and row["bytes_accessed"] > 0 and row["members"] == 2
    assert row["floor_s"] == pytest.approx(row["steps"] * row["bytes_accessed"] / 3.35e12)
    assert [p.name for p in (tmp_path / "mqar").iterdir()] == ["mqar_cost_cpu.json"]


def test_cost_times_the_step_and_names_its_overrides(tmp_path):
    out = paper_protocols.main(["--protocol=mqar", "--quick", "--cost", "--time-steps=2",
                                "--set=model.impl=chunk", f"--out={tmp_path}"])
    (row,) = out["cells"]
    assert row["ms_per_step"] > 0 and row["compile_s"] > 0
    assert row["measured_s"] == pytest.approx(row["steps"] * row["ms_per_step"] / 1e3)
    assert out["set"] == {"model.impl": "chunk"} and out["time_steps"] == 2
    assert [p.name for p in (tmp_path / "mqar").iterdir()] == ["mqar_cost_cpu_impl-chunk.json"]


def test_cost_profiles_the_step(tmp_path):
    """--profile traces steps under jax.profiler: the wall time a step beside the device's busy
    time (0 on a CPU, which has no device plane; the host's events are there)."""
    out = paper_protocols.main(["--protocol=mqar", "--quick", "--cost", "--profile=2",
                                f"--out={tmp_path}"])
    (row,) = out["cells"]
    t = row["trace"]
    assert t["steps"] == 2 and t["wall_ms"] > 0 and out["profile"] == 2
    assert (t["device_ms"], t["kernels"]) == (0.0, 0) and t["host_us"]
    assert "ms_per_step" not in row


def test_a_run_moved_or_computed_by_another_impl_is_the_same_run(tmp_path):
    """A run trained under another directory (a lent machine's) and brought back, or by another
    implementation of the mixer, is collected and reused; one of another config is not."""
    argv = ["--protocol=mqar", "--quick", "--steps=2"]
    there = paper_protocols.main(argv + [f"--out={tmp_path / 'there'}", "--set=model.impl=chunk"])
    shutil.copytree(tmp_path / "there" / "mqar", tmp_path / "here" / "mqar")
    here = paper_protocols.main(argv + [f"--out={tmp_path / 'here'}", "--collect",
                                        "--set=model.impl=auto"])
    (row,) = here["cells"]
    assert row["workdir"].startswith(str(tmp_path / "here")) and row["impl"] == "chunk"
    assert row["accuracy"] == there["cells"][0]["accuracy"]
    # Based's full Taylor map computes the function of its compact one (the quick cell's)
    (row,) = paper_protocols.main(argv + [f"--out={tmp_path / 'here'}", "--collect",
                                          "--set=model.mixer_options.based.compact=False"])["cells"]
    assert row["accuracy"] == there["cells"][0]["accuracy"]
    with pytest.raises(SystemExit, match="no finished cell"):
        paper_protocols.main(argv + [f"--out={tmp_path / 'here'}", "--collect",
                                     "--set=model.d_model=8"])
    # the same number of test sequences in smaller batches is the same run; fewer is not
    cut = lambda rows, n: [f"--set=eval.batch_size={rows}", f"--set=eval.batches={n}"]  # noqa: E731
    (row,) = paper_protocols.main(argv + [f"--out={tmp_path / 'here'}", "--collect",
                                          *cut(2, 2)])["cells"]
    assert row["accuracy"] == there["cells"][0]["accuracy"]
    with pytest.raises(SystemExit, match="no finished cell"):
        paper_protocols.main(argv + [f"--out={tmp_path / 'here'}", "--collect", *cut(2, 1)])


def test_rebaseline_writes_the_tasks_baselines_into_runs_made_before_them(tmp_path):
    """A finished run whose result predates a baseline (here: none at all) and whose config
    predates `eval.length_range` is still the same run; --collect --rebaseline recomputes the
    baselines on its own evaluation tasks, per seed, and writes them into its result."""
    argv = ["--protocol=icl_regression", "--quick", f"--out={tmp_path}"]
    (row,) = paper_protocols.main(argv)["runs"]
    path = pathlib.Path(row["workdir"]) / "result.json"
    result = json.loads(path.read_text())
    assert set(result["baseline"]) == {"gd", "gdpp", "zero"}
    old = json.loads(path.read_text())
    del old["baseline"], old["config"]["eval"]["length_range"]
    for seed in old["per_seed"]:
        del seed["baseline"]
    path.write_text(json.dumps(old))
    (row,) = paper_protocols.main(argv + ["--collect"])["runs"]
    assert row["GD++, one step per layer, MSE"][0] is None        # the same run, no baseline
    with pytest.raises(SystemExit):
        paper_protocols.main(argv + ["--rebaseline"])               # it needs --collect
    (row,) = paper_protocols.main(argv + ["--collect", "--rebaseline"])["runs"]
    again = json.loads(path.read_text())
    assert again["baseline"] == result["baseline"]
    assert [s["baseline"] for s in again["per_seed"]] == [s["baseline"] for s in result["per_seed"]]
    assert row["GD++, one step per layer, MSE"][0] == result["baseline"]["gdpp"]["loss"]


def test_a_shorter_cut_keeps_the_earlier_one_that_got_further(tmp_path, monkeypatch):
    """A run cut at step 2 by a later call leaves the earlier cut at step 4 (its partial.json and
    its metrics) in place; a cut that gets further replaces it."""
    from linear_jax.training import seeds

    args = paper_protocols.parse_args(["--protocol=mqar", "--quick", f"--out={tmp_path}"])
    ((_, _, config),) = paper_protocols.cell_configs(args, paper_protocols.importlib.import_module(
        "experiments.configs.paper_mqar"), paper_protocols.PROTOCOLS["mqar"])
    metrics = tmp_path / "mqar" / config.workdir.split("/")[-1] / "metrics.jsonl"

    def cut_at(step):
        def train_sweep(configs, seeds_, deadline=None, fresh_if_stale=False):
            metrics.write_text(f"step {step}\n")
            return [{"step": step, "partial": True, "seeds": list(seeds_)}]
        monkeypatch.setattr(seeds, "train_sweep", train_sweep)
        ((result, reused),) = paper_protocols.run_cell([config])
        partial = json.loads((metrics.parent / "partial.json").read_text())
        return result["step"], reused, partial["step"], metrics.read_text()

    assert cut_at(4) == (4, False, 4, "step 4\n")
    assert cut_at(2) == (4, True, 4, "step 4\n")
    assert cut_at(6) == (6, False, 6, "step 6\n")


def _mean_std_pairs(obj, out: set) -> set:
    """Every (value, value_std) pair of numbers in a result JSON, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            std = obj.get(f"{k}_std")
            if isinstance(v, (int, float)) and isinstance(std, (int, float)):
                out.add((float(v), float(std)))
            _mean_std_pairs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _mean_std_pairs(v, out)
    return out


def _decimals(s: str) -> float:
    return 10.0 ** -len(s.partition(".")[2])


@pytest.mark.parametrize("readme", ["README.md", "experiments/README.md"])
def test_every_mean_and_std_a_readme_states_is_in_a_committed_result(readme):
    """Issue 19's honesty rule: a "mean ± std" in the READMEs is read from a committed result
    JSON under experiments/results, at the digits printed (0.6 of the last digit: a value
    rounded from a table's four digits to three may be off by half a digit twice)."""
    found = set()
    for f in (ROOT / "experiments" / "results").rglob("*.json"):
        _mean_std_pairs(json.loads(f.read_text()), found)
    stated = re.findall(r"(-?\d+\.\d+) ?± ?(\d+\.\d+)", (ROOT / readme).read_text())
    assert len(stated) >= (1 if readme == "README.md" else 50)
    missing = [f"{m} ± {s}" for m, s in stated
               if not any(abs(a - float(m)) <= 0.6 * _decimals(m)
                          and abs(b - float(s)) <= 0.6 * _decimals(s) for a, b in found)]
    assert not missing, f"{readme} states {missing}, which no result JSON holds"


def test_the_device_scripts_default_jobs_name_cells_that_exist():
    """benchmarks/run_device.sh's default protocol jobs ("protocol|cells|flags|memory|precision"):
    each parses as paper_protocols would run it and picks at least one cell, at one learning rate
    (a typo there costs a device call), with a memory share in GiB and a known precision."""
    script = (ROOT / "benchmarks" / "run_device.sh").read_text()
    flags = dict(re.findall(r'^    ([AOZ])="([^"]*)"$', script, re.M))
    jobs = re.search(r'^    jobs="(.*?)"$', script, re.M | re.S).group(1)
    lines = [ln for ln in jobs.splitlines() if ln.strip()]
    assert len(lines) >= 10
    for line in lines:
        proto, cells, extra, mem, prec = line.split("|")
        extra = re.sub(r"\$([AOZ])", lambda m: flags[m.group(1)], extra).replace("{out}", "/unused")
        args = paper_protocols.parse_args([f"--protocol={proto}", f"--cells={cells}",
                                           "--out=/unused", *extra.split()])
        protocol = paper_protocols.PROTOCOLS[proto]
        module = paper_protocols.importlib.import_module(
            f"experiments.configs.{protocol['config']}")
        grid = paper_protocols.cell_configs(args, module, protocol)
        assert len(grid) == 1, (line, [name for name, _, _ in grid])
        assert re.fullmatch(r"\d+G", mem) and prec in ("float32", "tensorfloat32"), line


def test_the_device_scheduler_starts_a_job_only_when_its_memory_share_fits(tmp_path):
    """benchmarks/run_device.sh's protocols scheduler, with `python3` replaced by a stub that
    logs each job's start and end: at PROTO_MEM_MAX 0.9 the second job (share 0.5) waits for
    the first (0.5) to end, and the third (0.3) fits beside the second at once."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "run_device.sh", tmp_path / "benchmarks")
    stub, log = tmp_path / "bin" / "python3", tmp_path / "jobs.log"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\ncase "$*" in *paper_protocols*)\n'
                    f'  echo "start $(date +%s.%N) $*" >> {log}; sleep 1\n'
                    f'  echo "end $(date +%s.%N) $*" >> {log} ;;\nesac\n')
    stub.chmod(0o755)
    jobs = "\n".join(f"mqar|^{c}|--quick|{m}|float32"
                     for c, m in (("one", 0.5), ("two", 0.5), ("three", 0.3)))
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "PROTO_JOBS": jobs,
           "PROTO_P": "3", "PROTO_S": "60", "PROTO_MIN_S": "10", "PROTO_MEM_MAX": "0.9",
           "PROTO_TREE": "1", "FAST_COMPILE": "0", "OUT": str(tmp_path / "out"),
           "LOGS": str(tmp_path / "logs"), "PROTO_LOGDIR": str(tmp_path / "logs")}
    subprocess.run(["bash", "benchmarks/run_device.sh", "protorun"], cwd=tmp_path, env=env,
                   capture_output=True, timeout=60, check=False)
    times = {}
    for line in log.read_text().splitlines():
        what, t, *args = line.split()
        cell = next(a for a in args if a.startswith("--cells=")).removeprefix("--cells=^")
        times[what, cell] = float(t)
    assert len(times) == 6, times
    assert times["start", "two"] >= times["end", "one"]
    assert times["start", "three"] < times["end", "two"]
    assert not list((tmp_path / "logs").glob("*.mem"))     # every share released at its end
