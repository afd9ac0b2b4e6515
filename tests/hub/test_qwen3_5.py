"""Qwen3.5 as released, the language model of a multimodal checkpoint (Qwen3-Next's layers with
Qwen3.5's split projections, the config under `text_config`, a vision tower left on disk), against
its transformers fixtures: the MoE model (Qwen3_5MoeForConditionalGeneration) through the checks
of tests/hub/checks.py that its format can change, the dense one (Qwen3_5ForConditionalGeneration,
head tied by the top-level field) through its logits and save. The packed-document and bfloat16
checks exercise the layers alone, which test_qwen3_next.py runs them on."""

from linear_jax import hub
from linear_jax.hub import files
from tests.hub.checks import (  # noqa: F401  (the shared checks, collected here)
    TOL,
    _assert_same,
    forward,
    loaded,
    test_decode,
    test_logits,
    test_mesh,
    test_round_trip,
)
from tests.hub.common import ROOT, copy, golden, tensors
from tests.utils import assert_close

FAMILY = "qwen3_5_moe"


def test_dense(tmp_path):
    """Saved as the text-only Qwen3_5ForCausalLM, it loads back the same."""
    model, g = hub.load(ROOT / "qwen3_5"), golden("qwen3_5")
    assert model.config.tie_embeddings and model.config.ffn == "mlp"
    assert_close(forward(model)(g["prompt_a"]), g["logits_a"], TOL, "qwen3_5 prompt a")
    hub.save(model, tmp_path)
    assert files.read_config(tmp_path)["architectures"] == ["Qwen3_5ForCausalLM"]
    again = hub.load(tmp_path)
    assert again.config == model.config
    _assert_same(again, model)


def test_mtp_head_left_on_disk(tmp_path):
    """Released checkpoints carry a multi-token-prediction head (`mtp.*`), which transformers'
    LM does not load either."""
    t = tensors(ROOT / FAMILY)
    t["mtp.fc.weight"] = t["lm_head.weight"][:, :16]
    _assert_same(hub.load(copy(FAMILY, tmp_path / "c", tensors_=t)), hub.load(ROOT / FAMILY))
