"""Builds the golden fixtures of `tests/hub`: tiny random-weight checkpoints of each family, made
with transformers' own classes, and the PyTorch float32 logits they give on fixed prompts.

    python -m venv /tmp/hubvenv
    /tmp/hubvenv/bin/pip install torch transformers safetensors numpy    # CPU torch is enough
    /tmp/hubvenv/bin/python tools/make_hub_fixtures.py [family ...]

Not a dependency of the library, its tests or CI: it needs torch and transformers, which
linear_jax never imports. Each family lands in `tests/fixtures/hub/<family>/`: what
`save_pretrained` writes (config.json, *.safetensors, and an index when sharded) and
`golden.npz` with the prompts (`prompt_a` [1, 12], `prompt_b` [1, 7], int32) and the logits of
each run alone (`logits_a`, `logits_b`, float32). The two prompts packed into one row with segment
ids must give the same logits (the tests check it); transformers' reference forwards of these
families take no document boundaries, so each prompt runs alone here.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hub"
VOCAB = 96


def mamba():
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8,
                                   num_hidden_layers=2, expand=2, conv_kernel=4,
                                   tie_word_embeddings=True)
    return transformers.MambaForCausalLM(cfg), {}


def mamba2():
    # two groups of B and C (and of the gated norm), one untied head, and sharded files
    cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8,
                                    num_hidden_layers=2, expand=2, num_heads=8, head_dim=8,
                                    n_groups=2, conv_kernel=4, chunk_size=8,
                                    tie_word_embeddings=False)
    return transformers.Mamba2ForCausalLM(cfg), {"max_shard_size": "40KB"}


def qwen3_next():
    # one Gated DeltaNet layer (grouped: 2 key heads, 4 value heads) and one gated-attention
    # layer (GQA, partial RoPE), each followed by a 4-expert top-2 MoE with a shared expert
    cfg = transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25},
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, decoder_sparse_step=1,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts_per_tok=2,
        num_experts=4, norm_topk_prob=True, tie_word_embeddings=False, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return transformers.Qwen3NextForCausalLM(cfg), {}


def xlstm():
    # xLSTM 7B's block (mLSTM + SwiGLU), gate and logit soft caps; the kernels in float32 (the
    # default autocasts q, k, v to bfloat16) and a chunk that leaves a recurrent tail
    cfg = transformers.xLSTMConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, chunk_size=8,
        autocast_kernel_dtype="float32", ffn_proj_factor=2.0, ffn_round_up_to_multiple_of=16,
        weight_mode="single", tie_word_embeddings=False)
    return transformers.xLSTMForCausalLM(cfg), {}


def minimax():
    # lightning, lightning, softmax attention (GQA); MiniMax-01's scaled normed residuals; a
    # lightning block shorter than the prompt so its block-wise path runs
    cfg = transformers.MiniMaxConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, block_size=8, max_position_embeddings=64,
        layer_types=["linear_attention", "linear_attention", "full_attention"],
        full_attn_alpha_factor=1.5, full_attn_beta_factor=0.5, linear_attn_alpha_factor=2.0,
        linear_attn_beta_factor=0.75, mlp_alpha_factor=1.25, mlp_beta_factor=0.8,
        tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return transformers.MiniMaxForCausalLM(cfg), {}


def recurrent_gemma():
    # Griffin's (recurrent, recurrent, attention) pattern over 4 layers: an RG-LRU wider than the
    # model (block-diagonal gates over 4 heads), MQA local attention whose window (5) is shorter
    # than the prompt, partial RoPE, GeGLU with biases, a logit soft cap the logits reach
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, lru_width=48, attention_window_size=5,
        conv1d_width=4, logits_soft_cap=3.0, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    return transformers.RecurrentGemmaForCausalLM(cfg), {}


def kimi_linear():
    # KDA, then MLA (NoPE, shared key part); a first dense layer wider than the experts, then a
    # sigmoid-routed MoE (score bias, two expert groups of which one is kept, scaled weights)
    # with two shared experts
    cfg = transformers.KimiLinearConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse"], intermediate_size=24,
        linear_num_heads=4, linear_head_dim=8, linear_conv_kernel_dim=4, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, n_shared_experts=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.446, norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return transformers.KimiLinearForCausalLM(cfg), {}


# Qwen3.5 as released: the language model inside the multimodal model, beside a vision tower
# (one block) that the loader leaves on disk
_QWEN3_5_VISION = dict(depth=1, hidden_size=8, intermediate_size=8, num_heads=2, patch_size=2,
                       temporal_patch_size=1, spatial_merge_size=1, out_hidden_size=32,
                       num_position_embeddings=4)
# Qwen3-Next's layers (grouped Gated DeltaNet, GQA with partial RoPE) stored Qwen3.5's way; MRoPE
# sections that a text prompt reduces to 1-D RoPE
_QWEN3_5_TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"], num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [1, 1, 0], "mrope_interleaved": True},
    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=64)


def qwen3_5():
    # dense SwiGLU; the head tied by the top-level field (the text config's says untied)
    cfg = transformers.Qwen3_5Config(text_config=dict(_QWEN3_5_TEXT, intermediate_size=24),
                                     vision_config=_QWEN3_5_VISION, tie_word_embeddings=True)
    cfg.text_config._attn_implementation = "eager"
    return transformers.Qwen3_5ForConditionalGeneration(cfg), {}


def qwen3_5_moe():
    # a 4-expert top-2 MoE with a shared expert in every layer
    cfg = transformers.Qwen3_5MoeConfig(
        text_config=dict(_QWEN3_5_TEXT, moe_intermediate_size=8, shared_expert_intermediate_size=16,
                         num_experts_per_tok=2, num_experts=4),
        vision_config=_QWEN3_5_VISION, tie_word_embeddings=False)
    cfg.text_config._attn_implementation = "eager"
    return transformers.Qwen3_5MoeForConditionalGeneration(cfg), {}


FAMILIES = {"mamba": mamba, "mamba2": mamba2, "qwen3_next": qwen3_next, "xlstm": xlstm,
            "minimax": minimax, "recurrent_gemma": recurrent_gemma, "kimi_linear": kimi_linear,
            "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe}


def perturb(model, gen):
    """Random weights everywhere, norms included: a norm left at one, a zero bias or D would
    let a loader that drops or transposes it pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("recurrent_param"):
                continue    # transformers' Griffin init: a_t near 1, where sqrt(1 - a_t^2) bites
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 3 + 0.5))
            elif "norm" in name or name.endswith(".D"):
                # around 1 in effect: Qwen3-Next's zero-centred norms hold w for a scale of 1 + w
                centre = 0.0 if zero_centred(model, name) else 1.0
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.25)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):        # Kimi's routing bias, stored
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def zero_centred(model, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return type(module).__name__ in ("Qwen3NextRMSNorm", "RecurrentGemmaRMSNorm",
                                     "Qwen3_5RMSNorm", "Qwen3_5MoeRMSNorm")


def build(name: str):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    model, save_kw = FAMILIES[name]()
    perturb(model, gen)
    model.eval()
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, **save_kw)
    rng = np.random.default_rng(7)
    prompts = {k: rng.integers(0, VOCAB, (1, n)).astype(np.int32)
               for k, n in (("a", 12), ("b", 7))}
    golden = {}
    with torch.no_grad():
        for k, p in prompts.items():
            logits = model(torch.from_numpy(p).long(), use_cache=False).logits
            golden[f"prompt_{k}"], golden[f"logits_{k}"] = p, logits.float().numpy()
    np.savez_compressed(out / "golden.npz", **golden)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1024:.0f} KiB in {out}")


if __name__ == "__main__":
    for family in sys.argv[1:] or FAMILIES:
        build(family)
