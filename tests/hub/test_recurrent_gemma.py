"""RecurrentGemma (RecurrentGemmaForCausalLM: RG-LRU recurrent blocks and local MQA attention whose
window is shorter than the prompt, GeGLU with biases, scaled embeddings, logit soft cap) against
its transformers fixture; the checks are tests/hub/checks.py's, plus the older config layout."""

from linear_jax import hub
from tests.hub.checks import *  # noqa: F403  (the shared checks, collected here)
from tests.hub.common import ROOT, config, copy

FAMILY = "recurrent_gemma"


def test_top_level_rope_fields(tmp_path):
    """Older configs (the released checkpoints') keep rope_theta and partial_rotary_factor at the
    top level and say embeddings_scale_by_sqrt_dim: the same model."""
    c = config(FAMILY)
    rope = c.pop("rope_parameters")
    c.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
             embeddings_scale_by_sqrt_dim=True)
    old = hub.read_config(copy(FAMILY, tmp_path / "old", config=c))
    assert old == hub.read_config(ROOT / FAMILY)
    assert old.options("attention")["rotary_dim"] == 4


def test_decoding_memory_is_constant(loaded):
    """No max_len: the window bounds the attention layer's cache (the last window - 1 tokens)."""
    _, model, _ = loaded
    cache = model.init_cache(1)
    window = model.config.options("attention")["window"]
    assert [c["k"].shape[1] for c in cache if "k" in c] == [window - 1]
