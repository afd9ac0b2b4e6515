"""experiments/hedgehog_convert.py end to end at its smoke-test size."""

import json
import math

import pytest

from experiments import hedgehog_convert


@pytest.mark.smoke
def test_script_quick(tmp_path):
    assert hedgehog_convert.main(["--quick", f"--workdir={tmp_path}"]) == 0
    out = json.loads((tmp_path / "hedgehog_convert.json").read_text())
    assert set(out["final_eval_loss"]) == {"teacher (softmax)", "converted (Hedgehog)",
                                           "scratch (Hedgehog)"}
    assert all(math.isfinite(v) for v in out["final_eval_loss"].values())
    kl = out["attention_kl_per_layer"]
    assert set(kl) == {"identity maps", "distilled", "fine-tuned"}
    assert all(len(v) == out["config"]["model"]["num_layers"] and min(v) >= -1e-5
               for v in kl.values())
    assert len(out["distill_kl"]) == out["distill_steps"]
    assert (tmp_path / "hedgehog_convert.png").exists()
