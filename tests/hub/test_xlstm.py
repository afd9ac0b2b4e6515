"""xLSTM (xLSTMForCausalLM: mLSTM + SwiGLU blocks, soft caps) against its transformers fixture;
the checks are tests/hub/checks.py's, plus the fused weight layout."""

import numpy as np

from tests.hub.checks import *  # noqa: F403  (the shared checks, collected here)
from tests.hub.checks import forward
from tests.hub.common import config, copy, golden, tensors
from tests.utils import assert_close

FAMILY = "xlstm"


def test_fused_weight_mode(tmp_path):
    """The same weights with q, k, v, o-gate / i, f gates / SwiGLU up-projections fused by rows
    ("fused" weight_mode) give the same logits."""
    from linear_jax import hub

    t = tensors(copy(FAMILY, tmp_path / "src"))
    for i in range(config(FAMILY)["num_hidden_layers"]):
        a, f = f"backbone.blocks.{i}.mlstm_layer.", f"backbone.blocks.{i}.ffn."
        t[a + "qkv_opreact.weight"] = np.concatenate(
            [t.pop(a + n + ".weight") for n in ("q", "k", "v", "ogate_preact")])
        for part in ("weight", "bias"):
            t[a + f"ifgate_preact.{part}"] = np.concatenate(
                [t.pop(a + f"{g}gate_preact.{part}") for g in "if"])
        t[f + "proj_up_gate_z.weight"] = np.concatenate(
            [t.pop(f + "proj_up_gate.weight"), t.pop(f + "proj_up.weight")])
    c = dict(config(FAMILY), weight_mode="fused")
    g = golden(FAMILY)
    model = hub.load(copy(FAMILY, tmp_path / "fused", config=c, tensors_=t))
    assert_close(forward(model)(g["prompt_a"]), g["logits_a"], 1e-4, "fused")
