"""experiments/mqar_sweep.py: --quick on two tiny cells writes its JSON and plot, a second call
reuses the finished cells, --shard trains only its share of the grid and --collect combines the
shards' cells, and the state sizes are those of the mixers' recurrences."""

import json
import pathlib

import ml_collections
import pytest

from experiments import mqar_sweep


@pytest.mark.smoke
def test_quick_sweep_two_cells_writes_json_and_plot_and_reuses(tmp_path, capsys):
    argv = ["--quick", "--mixers=attention,linear_attention", "--d_models=16", "--num_devices=1",
            f"--out={tmp_path}"]
    summary = mqar_sweep.main(argv)
    printed = capsys.readouterr().out
    assert "[1/2]" in printed and "[2/2]" in printed and "done in" in printed

    saved = json.loads((tmp_path / "mqar_sweep.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(summary["cells"]))
    cells = {c["mixer"]: c for c in saved["cells"]}
    assert sorted(cells) == ["attention", "linear_attention"]
    for c in cells.values():
        assert c["d_model"] == 16 and c["steps"] == mqar_sweep.QUICK["steps"]
        assert 0.0 <= c["accuracy"] <= 1.0 and c["params"] > 0 and not c["stopped"]
        assert not (pathlib.Path(c["workdir"]) / "checkpoints").exists()
    # d_model 16, 2 heads: linear attention K = V = 8 plus the normaliser column (V + 1);
    # attention: its KV cache at the training length
    assert cells["linear_attention"]["state_size"] == 2 * 8 * 9
    assert cells["attention"]["state_size"] == 2 * mqar_sweep.QUICK["seq_len"] * 16
    assert (tmp_path / "mqar_sweep.png").stat().st_size > 0

    again = mqar_sweep.main(argv)                      # finished cells are not trained again
    assert all(r.get("reused") for r in again["runs"])
    assert [c["accuracy"] for c in again["cells"]] == [c["accuracy"] for c in saved["cells"]]


def test_state_size_per_layer_of_gla_mamba2_and_based():
    model = ml_collections.ConfigDict({"d_model": 32, "num_layers": 2, "num_heads": 2,
                                       "mixer": "gla"})
    size = lambda: mqar_sweep.state_size_per_layer(model, 17, seq_len=64)
    assert size() == 2 * 8 * 16                        # H K V, K = 32 * 0.5 / 2, V = 16
    model.mixer = "mamba2"
    assert size() == 16 * 2 * 32                       # H N P = d_state * expand * d_model
    model.mixer = "based"
    assert size() == 2 * (1 + 16 + 16 ** 2) * (16 + 1)  # H F (V + 1), Taylor features of 16


def test_cell_config_sets_the_cell_and_replaces_mixer_options(tmp_path):
    args = mqar_sweep.parse_args(["--quick", "--d_models=16", "--lrs=1e-3"])
    c = mqar_sweep.cell_config(args, "attention", 48, 1e-3, tmp_path)
    assert (c.model.mixer, c.model.d_model, c.train.lr) == ("attention", 48, 1e-3)
    assert dict(c.model.mixer_options) == {}           # mqar.py's gla options are not kept
    c = mqar_sweep.cell_config(args, "gla", 16, 1e-3, tmp_path)
    assert c.model.mixer_options.gla.conv_size == 4
    assert c.task.params.num_kv_pairs == mqar_sweep.QUICK["num_kv_pairs"]
    assert c.model.impl == "auto" and mqar_sweep.cell_config(
        args, "based", 16, 1e-3, tmp_path).model.impl == "chunk"


def test_ffn_flag_drops_the_mlp_and_the_default_keeps_the_config(tmp_path):
    """--ffn=none gives Zoology's mixer-only blocks; the default leaves the cell's config (the
    key under which a finished cell is reused) as it was before the flag existed."""
    from linear_jax.training import loop

    default = mqar_sweep.cell_config(mqar_sweep.parse_args(["--quick"]), "attention", 16, 3e-3,
                                     tmp_path)
    assert "ffn" not in default.model
    args = mqar_sweep.parse_args(["--quick", "--ffn=none"])
    c = mqar_sweep.cell_config(args, "attention", 16, 3e-3, tmp_path)
    assert c.model.ffn == "none"
    assert loop.lm_config(c.model, 33).ffn == "none"


# not smoke-marked: two 20-step cells, about 5 s on a shared 2-core CPU
def test_shards_train_their_own_cells_and_collect_combines_them(tmp_path, capsys):
    base = ["--quick", "--mixers=attention,linear_attention", "--d_models=16", "--num_devices=1",
            f"--out={tmp_path}"]
    for i in (0, 1):                    # one after another here; concurrent processes on a GPU
        shard = mqar_sweep.main([*base, f"--shard={i}/2"])
        assert [(r["mixer"], r.get("reused")) for r in shard["runs"]] == [
            (("attention", "linear_attention")[i], None)]
        assert (tmp_path / f"mqar_sweep.shard{i}of2.json").exists()
    assert not any((tmp_path / f).exists() for f in ("mqar_sweep.json", "mqar_sweep.png"))

    collected = mqar_sweep.main([*base, "--collect"])
    assert "collected 2 of 2 runs" in capsys.readouterr().out
    saved = json.loads((tmp_path / "mqar_sweep.json").read_text())
    assert sorted(c["mixer"] for c in saved["cells"]) == ["attention", "linear_attention"]
    assert saved["missing"] == [] and collected["cells"] == saved["cells"]
    assert (tmp_path / "mqar_sweep.png").stat().st_size > 0

    # a cell without its result.json is listed as missing, not trained
    (tmp_path / "runs" / "linear_attention_d16" / "result.json").unlink()
    partial = mqar_sweep.main([*base, "--collect"])
    assert [c["mixer"] for c in partial["cells"]] == ["attention"]
    assert partial["missing"] == ["linear_attention_d16"]
    assert not (tmp_path / "runs" / "linear_attention_d16" / "result.json").exists()


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/2", "0/0"])
def test_shard_flag_rejects_bad_forms(bad, capsys):
    with pytest.raises(SystemExit):
        mqar_sweep.parse_args(["--quick", f"--shard={bad}"])
    assert "--shard" in capsys.readouterr().err
