"""Kimi Linear (`KimiLinearForCausalLM`): a hybrid of Kimi Delta Attention and multi-head latent
attention layers (`layer_types`), each followed by a SwiGLU MLP ("dense") or a mixture of
experts ("sparse", `mlp_layer_types`; by default every layer but the first).

    linear_attention -> `KDA` (per-channel decay -exp(A_log) softplus(x W_fa W_fb + dt_bias),
                        sigmoid beta, short convs, low-rank sigmoid output gate without bias,
                        per-head gated RMSNorm)
    full_attention   -> `MLA` without RoPE (`rope_theta=None`): Kimi's attention layers take
                        positions from the KDA layers; their shared key part stays unrotated
    sparse mlp       -> `SharedExpertMoE` with DeepSeek-V3's router (sigmoid scores, a score
                        bias that only chooses, group-limited top-k, renormalised weights scaled
                        by `routed_scaling_factor`) and `num_shared_experts` ungated shared
                        experts (one SwiGLU that many times `moe_intermediate_size` wide)

Two formats load. transformers' (what `save_pretrained` writes, and `save` here): `layer_types`
and `mlp_layer_types` lists, every feed-forward under `block_sparse_moe`. The release's
(Moonshot's config.json): the layers in `linear_attn_config` (1-indexed `kda_layers`,
`full_attn_layers`, with the KDA sizes), `first_k_dense_replace`, its own router fields (checked
at the one value transformers computes), and the dense layers under `mlp`. transformers reads
some fields under other names (`attribute_map`: `n_group` is stored as `num_expert_group`, ...);
both are read. The checkpoint stores the convolutions of q, k and v apart (`q_conv1d`, ...):
they fill the channels of our one short conv over [q | k | v].

Refused by name: `attention_bias`, activations other than silu, `num_key_value_heads` other than
`num_attention_heads` (transformers' MLA expands every head's key and value), MLA with RoPE
(`mla_use_nope=false`), routers other than sigmoid, multi-token prediction layers.
"""

from __future__ import annotations

import numpy as np

from linear_jax.hub.family import (
    MIXTRAL_EXPERT,
    SWIGLU,
    Family,
    Fields,
    Piece,
    decoder,
    experts,
    linears,
)
from linear_jax.models import LMConfig

NAME = "KimiLinearForCausalLM"
_HARMLESS = ("model_max_length", "max_position_embeddings", "attention_dropout",
             "output_router_logits", "pretraining_tp", "auto_map",
             # transformers derives these two from the rope and nope head dims
             "head_dim", "qk_head_dim",
             # no RoPE anywhere (mla_use_nope): positions reach no weight
             "rope_theta", "rope_scaling")
_KINDS = {"linear_attention": "kda", "full_attention": "mla"}
_FFNS = {"dense": "mlp", "sparse": "moe"}
# transformers' attribute_map: the name a config is read by -> the name it is stored under
_STORED = {"norm_topk_prob": "moe_renormalize", "n_group": "num_expert_group",
           "num_local_experts": "num_experts", "num_experts_per_tok": "num_experts_per_token",
           "n_shared_experts": "num_shared_experts"}


def _types(f: Fields, L: int):
    """layer_types and mlp_layer_types, as transformers' config derives them when absent."""
    linear = dict(f.take("linear_attn_config", {}))
    bad = sorted(set(linear) - {"full_attn_layers", "kda_layers", "num_heads", "head_dim",
                                "short_conv_kernel_size"})
    if bad:
        raise ValueError(f"{NAME}: config field linear_attn_config keys {bad} are not supported")
    if "full_attn_layers" in linear and "kda_layers" in linear:       # 1-indexed there
        lists = (linear["full_attn_layers"], linear["kda_layers"])
        if sorted(lists[0] + lists[1]) != list(range(1, L + 1)):
            raise ValueError(f"{NAME}: config field linear_attn_config must list each of the "
                             f"layers 1..{L} once in kda_layers or full_attn_layers")
        default = ["full_attention" if i + 1 in lists[0] else "linear_attention"
                   for i in range(L)]
    else:
        default = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(L)]
    types = f.take("layer_types", default)
    first_dense = f.take("first_k_dense_replace", 1)
    mlp = f.take("mlp_layer_types", ["dense" if i < first_dense else "sparse" for i in range(L)])
    for name, value, kinds in (("layer_types", types, _KINDS), ("mlp_layer_types", mlp, _FFNS)):
        if len(value) != L or set(value) - set(kinds):
            raise ValueError(f"{NAME}: config field {name} must list {L} of {sorted(kinds)}, "
                             f"got {value!r}")
    return types, mlp, linear


def to_lm(hf: dict) -> LMConfig:
    hf = dict(hf)
    for name, stored in _STORED.items():
        if name in hf:
            hf.setdefault(stored, hf.pop(name))
    f = Fields(hf, NAME, _HARMLESS)
    d, L = f.take("hidden_size", kind=int), f.take("num_hidden_layers", kind=int)
    types, mlp, linear = _types(f, L)
    f.expect("attention_bias", False)
    f.expect("hidden_act", "silu")
    H_attn = f.take("num_attention_heads", 32, kind=int)
    f.expect("num_key_value_heads", H_attn)
    rope, nope = f.take("qk_rope_head_dim", 64, kind=int), f.take("qk_nope_head_dim", 128,
                                                                    kind=int)
    # the release's own fields (transformers ignores them), at the values both compute with
    f.expect("mla_use_nope", True)
    f.expect("moe_router_activation_func", "sigmoid")
    f.expect("moe_layer_freq", 1)
    f.expect("use_grouped_topk", True)
    f.expect("num_nextn_predict_layers", 0)
    H = f.take("linear_num_heads", linear.get("num_heads", 32), kind=int)
    if d % H:
        raise ValueError(f"{NAME}: config field linear_num_heads={H} must divide "
                         f"hidden_size={d} here (LMConfig's heads divide d_model)")
    eps = float(f.take("rms_norm_eps", 1e-5))
    q_rank = f.optional("q_lora_rank")
    if q_rank is not None:
        q_rank = f.take("q_lora_rank", kind=int)
    options = {
        "kda": dict(head_dim=f.take("linear_head_dim", linear.get("head_dim", 128), kind=int),
                    conv_size=f.take("linear_conv_kernel_dim",
                                     linear.get("short_conv_kernel_size", 4), kind=int),
                    norm_eps=eps, gate_bias=False),
        # the latent norms keep their own eps (KimiLinearRMSNorm's default), not rms_norm_eps
        "mla": dict(attn_heads=H_attn, q_rank=q_rank,
                    kv_rank=f.take("kv_lora_rank", 512, kind=int), nope_dim=nope, rope_dim=rope,
                    v_dim=f.take("v_head_dim", 128, kind=int), rope_theta=None, norm_eps=1e-6),
    }
    moe = dict(scoring="sigmoid", score_bias=True,
               groups=f.take("num_expert_group", 1, kind=int),
               topk_groups=f.take("topk_group", 1, kind=int),
               renormalize=bool(f.take("moe_renormalize", True)),
               scale=float(f.take("routed_scaling_factor", 2.446)), shared_gate=False)
    width = f.take("moe_intermediate_size", 1024, kind=int)
    config = LMConfig(
        vocab_size=f.take("vocab_size", kind=int), d_model=d, num_layers=L, num_heads=H,
        layers=tuple(_KINDS[t] for t in types), mixer_options=options, ffn="moe",
        ffn_layers=tuple(_FFNS[t] for t in mlp), d_ff=f.take("intermediate_size", 9216, kind=int),
        moe_d_ff=width, num_experts=f.take("num_experts", 256, kind=int),
        top_k=f.take("num_experts_per_token", 8, kind=int),
        moe_shared=width * f.take("num_shared_experts", 1, kind=int), moe_options=moe,
        tie_embeddings=bool(f.take("tie_word_embeddings", False)), norm_eps=eps,
        param_dtype=f.param_dtype())
    f.done()
    return config


def _dims(c: LMConfig) -> dict:
    """The KDA and MLA sizes of `c`, the layers' defaults filled in."""
    k, a = c.options("kda"), c.options("mla")
    H = a.get("attn_heads") or c.num_heads
    Dh = c.d_model // H
    return dict(K=k.get("head_dim") or c.d_model // c.num_heads, H=H,
                nope=a.get("nope_dim") or Dh, rope=a.get("rope_dim") or Dh // 2,
                v=a.get("v_dim") or Dh, kv_rank=a.get("kv_rank") or c.d_model // 2)


def to_hf(c: LMConfig) -> dict:
    k, a, moe, n = c.options("kda"), c.options("mla"), dict(c.moe_options), _dims(c)
    kinds, ffns = {v: k for k, v in _KINDS.items()}, {v: k for k, v in _FFNS.items()}
    return {
        "architectures": [NAME], "model_type": "kimi_linear", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "num_hidden_layers": c.num_layers,
        "layer_types": [kinds[m] for m in c.layer_mixers()],
        "mlp_layer_types": [ffns[c.layer_ffn(i)] for i in range(c.num_layers)],
        "hidden_act": "silu", "attention_bias": False, "rms_norm_eps": c.norm_eps,
        "linear_num_heads": c.num_heads, "linear_head_dim": n["K"],
        "linear_conv_kernel_dim": k.get("conv_size", 4),
        "num_attention_heads": n["H"], "num_key_value_heads": n["H"],
        "q_lora_rank": a.get("q_rank"), "kv_lora_rank": n["kv_rank"],
        "qk_nope_head_dim": n["nope"], "qk_rope_head_dim": n["rope"], "head_dim": n["rope"],
        "qk_head_dim": n["nope"] + n["rope"], "v_head_dim": n["v"],
        "intermediate_size": c.ff_width, "moe_intermediate_size": c.moe_width,
        "num_experts": c.num_experts, "num_experts_per_token": c.top_k,
        "num_shared_experts": c.moe_shared // c.moe_width,
        "num_expert_group": moe.get("groups", 1), "topk_group": moe.get("topk_groups", 1),
        "moe_renormalize": moe.get("renormalize", True),
        "routed_scaling_factor": moe.get("scale", 1.0),
        "tie_word_embeddings": c.tie_embeddings, "dtype": c.param_dtype}


def tensors(c: LMConfig, hf: dict | None = None) -> dict:
    release = "linear_attn_config" in (hf or {})
    hf = to_hf(c)
    C = hf["linear_num_heads"] * hf["linear_head_dim"]          # channels of each of q, k, v

    def layer(i: int, mixer: str, p: str, b: tuple) -> dict:
        m, a, ffn = b + ("mixer",), p + "self_attn.", b + ("ffn",)
        if mixer == "kda":
            t = linears(a, m, [("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                               ("b_proj", "b_proj"), ("f_a_proj", "f_down"),
                               ("f_b_proj", "f_up"), ("g_a_proj", "gate_down"),
                               ("g_b_proj", "gate_up"), ("o_proj", "o_proj")])
            for j, n in enumerate("qkv"):
                t[a + f"{n}_conv1d.weight"] = (Piece(m + ("conv", "weight"), "conv",
                                                     cols=np.arange(j * C, (j + 1) * C)),)
            t[a + "A_log"] = (m + ("A_log",), "heads_4d")
            t[a + "dt_bias"] = (m + ("dt_bias",), "same")
            t[a + "o_norm.weight"] = (m + ("o_norm", "scale"), "same")
        else:
            q = ([("q_proj", "q_proj")] if hf["q_lora_rank"] is None else
                 [("q_a_proj", "q_a_proj"), ("q_b_proj", "q_b_proj")])
            t = linears(a, m, q + [("kv_a_proj_with_mqa", "kv_a_proj"),
                                   ("kv_b_proj", "kv_b_proj"), ("o_proj", "o_proj")])
            norms = ["kv_a"] if hf["q_lora_rank"] is None else ["q_a", "kv_a"]
            for n in norms:
                t[a + f"{n}_layernorm.weight"] = (m + (f"{n}_norm", "scale"), "same")
        moe = p + "block_sparse_moe."
        if c.layer_ffn(i) == "mlp":
            return {**t, **linears(p + "mlp." if release else moe, ffn, SWIGLU)}
        r = ffn + ("routed",)
        t[moe + "gate.weight"] = (r + ("router", "kernel"), "linear")
        t[moe + "gate.e_score_correction_bias"] = (r + ("score_bias",), "same")
        return {**t, **experts(moe, r, c.num_experts, MIXTRAL_EXPERT),
                **linears(moe + "shared_experts.", ffn + ("shared",), SWIGLU)}

    return decoder(c, layer)


def matches(c: LMConfig) -> bool:
    """Whether `to_hf` describes `c`: Kimi's layers with Kimi's options (the mixers' defaults
    are the papers' layers, not Kimi's) and its MoE."""
    mixers, k, a, moe = set(c.layer_mixers()), c.options("kda"), c.options("mla"), dict(
        c.moe_options)
    kda = "kda" not in mixers or (k.get("gate_bias") is False and k.get("expand_v", 1.0) == 1
                                  and not k.get("allow_neg_eigval") and not k.get("num_kv_heads")
                                  and k.get("norm_eps") == c.norm_eps)
    mla = "mla" not in mixers or ("rope_theta" in a and a["rope_theta"] is None
                                  and a.get("norm_eps") == 1e-6)
    return (mixers <= set(_KINDS.values()) and kda and mla and c.ffn == "moe"
            and c.moe_shared > 0 and c.moe_shared % c.moe_width == 0
            and moe.get("scoring") == "sigmoid" and moe.get("score_bias") is True
            and moe.get("shared_gate") is False and c.norm_offset == 0 and c.residual == "pre")


KIMI_LINEAR = Family(NAME, "kimi_linear", to_lm, to_hf, tensors, matches)
