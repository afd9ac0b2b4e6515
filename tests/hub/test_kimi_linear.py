"""Kimi Linear (KimiLinearForCausalLM: KDA + MLA without RoPE, a first dense layer, then MoE with
DeepSeek-V3's router and shared experts) against its transformers fixture; the checks are
tests/hub/checks.py's."""

from tests.hub.checks import *  # noqa: F403  (the shared checks, collected here)

FAMILY = "kimi_linear"


def test_release_format(tmp_path):
    """The fixture rewritten as Moonshot's release writes it (layers in `linear_attn_config`,
    `first_k_dense_replace`, its router fields, dense layers under `mlp`) loads the same
    weights into the same model."""
    from linear_jax import hub
    from tests.hub.checks import _assert_same
    from tests.hub.common import config, copy, tensors

    c = config(FAMILY)
    types = c.pop("layer_types")        # 1-indexed in the release
    assert c.pop("mlp_layer_types") == ["dense", "sparse"]
    heads, dim, width = (c.pop(k) for k in ("linear_num_heads", "linear_head_dim",
                                            "linear_conv_kernel_dim"))
    c.update(first_k_dense_replace=1, mla_use_nope=True, moe_router_activation_func="sigmoid",
             moe_layer_freq=1, use_grouped_topk=True, num_nextn_predict_layers=0,
             rope_theta=10000.0, rope_scaling=None, head_dim=72, linear_attn_config={
                 "kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
                 "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
                 "num_heads": heads, "head_dim": dim, "short_conv_kernel_size": width})
    t = {n.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): v
         for n, v in tensors(copy(FAMILY, tmp_path / "src")).items()}
    model = hub.load(copy(FAMILY, tmp_path / "release", config=c, tensors_=t))
    want = hub.load(copy(FAMILY, tmp_path / "fixture"))
    assert model.config == want.config
    _assert_same(model, want)
