"""A checkpoint the loader cannot express exactly raises a ValueError naming the field or tensor,
and does so before any parameter reaches a device (`jax.device_put` is made to fail)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from linear_jax import hub
from linear_jax.hub import files
from linear_jax.models import LM, LMConfig
from tests.hub.common import config, copy, tensors


@pytest.fixture(autouse=True)
def no_device_put(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("device_put before the checkpoint was checked")
    monkeypatch.setattr(jax, "device_put", refuse)


def _raises(path, match, **kw):
    with pytest.raises(ValueError, match=match):
        hub.load(path, **kw)


@pytest.mark.parametrize("field, value, family", [
    ("architectures", ["MambaForSequenceClassification"], "mamba"),
    ("architectures", ["MambaForCausalLM", "Mamba2ForCausalLM"], "mamba"),
    ("use_bias", True, "mamba"),
    ("use_conv_bias", False, "mamba2"),
    ("hidden_act", "gelu", "mamba"),
    ("intermediate_size", 48, "mamba"),
    ("time_step_limit", [0.0, 10.0], "mamba2"),
    ("dtype", "int8", "mamba"),
    ("made_up_field", 1, "mamba2"),
    ("vocab_size", None, "mamba"),
    ("num_hidden_layers", 0, "mamba2"),
    ("attention_bias", True, "qwen3_next"),
    ("norm_topk_prob", False, "qwen3_next"),
    ("mlp_only_layers", [0], "qwen3_next"),
    ("layer_types", ["linear_attention", "sliding_attention"], "qwen3_next"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "qwen3_next"),
    ("add_out_norm", False, "xlstm"),
    ("v_dim_factor", 0.5, "xlstm"),
    ("weight_mode", "mixed", "xlstm"),
    ("embedding_dim", 48, "xlstm"),
    ("sliding_window", 4, "minimax"),
    ("layer_types", ["linear_attention", "linear_attention", "moe"], "minimax"),
    ("attention_bias", True, "recurrent_gemma"),
    ("hidden_activation", "gelu", "recurrent_gemma"),
    ("block_types", ["recurrent", "mlp"], "recurrent_gemma"),
    ("head_dim", 16, "recurrent_gemma"),
    ("embeddings_scale_by_sqrt_dim", False, "recurrent_gemma"),
    ("partial_rotary_factor", 0.1, "recurrent_gemma"),
    ("num_key_value_heads", 2, "kimi_linear"),
    ("mla_use_nope", False, "kimi_linear"),
    ("mlp_layer_types", ["dense"], "kimi_linear"),
    ("dtype", "int8", "qwen3_5"),                       # the top level's, not text_config's
    ("made_up_field", 1, "qwen3_5_moe"),
    ("text_config", None, "qwen3_5"),
    ("text_config", {"model_type": "qwen3_next"}, "qwen3_5_moe"),
])
def test_bad_config_field(tmp_path, field, value, family):
    c = config(family)
    if value is None:
        del c[field]
    else:
        c[field] = value
    _raises(copy(family, tmp_path / "c", config=c), field)


@pytest.mark.parametrize("field, value, family", [
    ("attn_output_gate", False, "qwen3_5"),
    ("rope_parameters", {"rope_type": "default", "mrope_section": [1, 1, 0],
                         "rope_scaling_factor": 2.0}, "qwen3_5"),
    ("num_experts", 4, "qwen3_5"),                      # not a field of the dense model
    ("intermediate_size", 32, "qwen3_5_moe"),           # nor this one of the MoE model
    ("decoder_sparse_step", 2, "qwen3_5_moe"),
    ("norm_topk_prob", False, "qwen3_5_moe"),
])
def test_bad_text_config_field(tmp_path, field, value, family):
    """A multimodal checkpoint's language model is read from its text_config as strictly."""
    c = config(family)
    c["text_config"][field] = value
    _raises(copy(family, tmp_path / "c", config=c), field)


def test_multimodal_variant_mismatch(tmp_path):
    """The dense Qwen3.5 loader given the MoE model's config names its text config."""
    c = dict(config("qwen3_5_moe"), architectures=["Qwen3_5ForConditionalGeneration"])
    _raises(copy("qwen3_5_moe", tmp_path / "c", config=c), "text_config")


def test_mamba2_heads(tmp_path):
    c = dict(config("mamba2"), head_dim=16)
    _raises(copy("mamba2", tmp_path / "c", config=c), "num_heads \\* head_dim")


@pytest.mark.parametrize("family, name", [
    ("mamba", "backbone.layers.1.mixer.A_log"), ("mamba2", "backbone.layers.1.mixer.A_log"),
    ("qwen3_next", "model.layers.1.mlp.experts.3.up_proj.weight"),
    ("qwen3_next", "model.layers.0.linear_attn.in_proj_qkvz.weight"),
    ("recurrent_gemma", "model.layers.1.temporal_block.rg_lru.recurrent_param"),
    ("kimi_linear", "model.layers.0.self_attn.k_conv1d.weight"),
    ("qwen3_5", "model.language_model.layers.0.linear_attn.in_proj_z.weight")])
def test_missing_tensor(tmp_path, family, name):
    t = tensors(copy(family, tmp_path / "src"))
    del t[name]
    _raises(copy(family, tmp_path / "c", tensors_=t), "missing tensor.*" + name)


@pytest.mark.parametrize("family, name, like", [
    ("mamba", "lm_head.weight", "backbone.embeddings.weight"),          # the head is tied here
    # beside the vision tower the loader leaves on disk, the language model's are all checked
    ("qwen3_5", "model.language_model.layers.0.mlp.experts.0.up_proj.weight",
     "model.language_model.layers.0.mlp.up_proj.weight")])
def test_extra_tensor(tmp_path, family, name, like):
    t = tensors(copy(family, tmp_path / "src"))
    t[name] = t[like]
    _raises(copy(family, tmp_path / "c", tensors_=t), f"unexpected tensor.*{name}")


@pytest.mark.parametrize("family, name", [
    ("mamba", "backbone.layers.0.mixer.x_proj.weight"),
    ("qwen3_next", "model.layers.0.linear_attn.in_proj_ba.weight"),
    ("qwen3_next", "model.layers.0.mlp.experts.0.down_proj.weight"),
    ("recurrent_gemma", "model.layers.0.temporal_block.rg_lru.input_gate_weight"),
    ("kimi_linear", "model.layers.0.self_attn.v_conv1d.weight"),
    ("qwen3_5_moe", "model.language_model.layers.0.linear_attn.in_proj_qkv.weight")])
def test_shape_mismatch(tmp_path, family, name):
    t = tensors(copy(family, tmp_path / "src"))
    t[name] = t[name][:-1]
    _raises(copy(family, tmp_path / "c", tensors_=t), f"{name}.*shape")


@pytest.mark.parametrize("dtype", [np.int32, np.float16])
def test_dtype_mismatch(tmp_path, dtype):
    t = tensors(copy("mamba2", tmp_path / "src"))
    name = "backbone.layers.0.mixer.D"
    t[name] = t[name].astype(dtype)
    _raises(copy("mamba2", tmp_path / "c", tensors_=t), f"{name}.*dtype")


def test_derived_tensor_mismatch(tmp_path):
    """MiniMax stores decay tables the config implies: a table that disagrees is refused."""
    t = tensors(copy("minimax", tmp_path / "src"))
    name = "model.layers.1.self_attn.slope_rate"
    t[name] = t[name] * 2
    _raises(copy("minimax", tmp_path / "c", tensors_=t), name)


def test_index_lists_absent_tensor(tmp_path):
    d = copy("mamba2", tmp_path / "c")
    index = (d / files.INDEX).read_text().replace('"weight_map": {',
                                                  '"weight_map": {"ghost": "x.safetensors", ')
    (d / files.INDEX).write_text(index)
    _raises(d, "ghost")


def test_not_a_checkpoint(tmp_path):
    _raises(tmp_path, "config.json")


def test_override_that_changes_weights(tmp_path):
    _raises(copy("mamba", tmp_path / "c"), "d_model", d_model=64)


def test_save_unsupported_model():
    model = LM(LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2), rngs=__import__(
        "flax").nnx.Rngs(0))
    with pytest.raises(ValueError, match="no checkpoint family.*gla"):
        hub.save(model, "/nonexistent")
