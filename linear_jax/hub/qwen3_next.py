"""Qwen3-Next (`Qwen3NextForCausalLM`): a hybrid of Gated DeltaNet and gated softmax attention
layers (`layer_types`), each followed by a mixture of experts with a shared expert.

    linear_attention -> `GatedDeltaNet` (grouped: `linear_num_key_heads` key heads serve
                        `linear_num_value_heads` value heads; l2-normalised q, k; gated norm)
    full_attention   -> `GatedAttention` (GQA, q/k RMS norms, partial RoPE, sigmoid output gate)
    mlp              -> `SharedExpertMoE` (softmax top-k, renormalised, + sigmoid-gated shared
                        expert); with `num_experts = 0` the SwiGLU `MLP`

The block and final norms are zero-centred (`LMConfig.norm_offset = 1`: scale 1 + w, w stored).
The checkpoint fuses per key head [q | k | v | z] into `in_proj_qkvz` and [b | a] into
`in_proj_ba`; their rows are split into our separate projections on load and fused back on save.

Refused by name: `attention_bias`, RoPE types other than "default", `norm_topk_prob = false`,
`mlp_only_layers`, and a `decoder_sparse_step > 1` whose dense layers are wider than the experts
(`intermediate_size != moe_intermediate_size`: LMConfig has one d_ff).
"""

from __future__ import annotations

from linear_jax.hub.family import Family, Fields, Piece, fused_rows
from linear_jax.models import LMConfig

NAME = "Qwen3NextForCausalLM"
_HARMLESS = ("max_position_embeddings", "attention_dropout", "output_router_logits",
             "router_aux_loss_coef")
_KINDS = {"linear_attention": "gated_deltanet", "full_attention": "gated_attention"}


def to_lm(hf: dict) -> LMConfig:
    f = Fields(hf, NAME, _HARMLESS)
    d, L = f.take("hidden_size", kind=int), f.take("num_hidden_layers", kind=int)
    types = f.take("layer_types", ["linear_attention" if (i + 1) % 4 else "full_attention"
                                   for i in range(L)])
    bad = sorted({t for t in types if t not in _KINDS})
    if bad or len(types) != L:
        raise ValueError(f"{NAME}: config field layer_types must list {L} of {sorted(_KINDS)}, "
                         f"got {types!r}")
    f.expect("attention_bias", False)
    f.expect("hidden_act", "silu")
    f.expect("mlp_only_layers", [])
    f.expect("norm_topk_prob", True)
    rope = dict(f.take("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}))
    if rope.get("rope_type", "default") != "default" or set(rope) - {
            "rope_type", "rope_theta", "partial_rotary_factor"}:
        raise ValueError(f"{NAME}: config field rope_parameters={rope!r} is not supported "
                         f"(only the default RoPE, with rope_theta and partial_rotary_factor)")
    head_dim = f.take("head_dim", 256, kind=int)
    K, V = f.take("linear_key_head_dim", 128, kind=int), f.take("linear_value_head_dim", 128,
                                                                  kind=int)
    Hk, H = f.take("linear_num_key_heads", 16, kind=int), f.take("linear_num_value_heads", 32,
                                                                   kind=int)
    if d % H:
        raise ValueError(f"{NAME}: config field linear_num_value_heads={H} must divide "
                         f"hidden_size={d} here (LMConfig's heads divide d_model)")
    eps = float(f.take("rms_norm_eps", 1e-6))
    E = f.take("num_experts", 512)
    step = f.take("decoder_sparse_step", 1, kind=int)
    width, moe_width = f.take("intermediate_size", 5632, kind=int), f.take(
        "moe_intermediate_size", 512, kind=int)
    if E and step > 1 and width != moe_width:
        raise ValueError(f"{NAME}: config fields intermediate_size={width} and "
                         f"moe_intermediate_size={moe_width} must match when "
                         f"decoder_sparse_step={step} > 1 (one d_ff for MLP and experts)")
    moe = dict(ffn="moe", d_ff=moe_width, num_experts=E, moe_every=step,
               top_k=f.take("num_experts_per_tok", 10, kind=int),
               moe_shared=f.take("shared_expert_intermediate_size", 512, kind=int))
    options = {
        "gated_deltanet": dict(head_dim=K, expand_v=V / K, num_kv_heads=Hk, norm_eps=eps,
                               conv_size=f.take("linear_conv_kernel_dim", 4, kind=int)),
        "gated_attention": dict(attn_heads=f.take("num_attention_heads", 16, kind=int),
                                num_kv_heads=f.take("num_key_value_heads", 2, kind=int),
                                head_dim=head_dim, norm_eps=eps,
                                rope_theta=float(rope.get("rope_theta", 10000.0)),
                                rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0))),
    }
    config = LMConfig(
        vocab_size=f.take("vocab_size", kind=int), d_model=d, num_layers=L, num_heads=H,
        layers=tuple(_KINDS[t] for t in types), mixer_options=options,
        tie_embeddings=bool(f.take("tie_word_embeddings", False)), norm_eps=eps,
        norm_offset=1.0, param_dtype=f.param_dtype(),
        **(moe if E else dict(ffn="mlp", d_ff=width)))
    f.done()
    return config


def to_hf(c: LMConfig) -> dict:
    g, a = c.options("gated_deltanet"), c.options("gated_attention")
    K = g.get("head_dim") or c.d_model // c.num_heads
    kinds = {v: k for k, v in _KINDS.items()}
    moe = c.ffn == "moe"
    return {
        "architectures": [NAME], "model_type": "qwen3_next", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "num_hidden_layers": c.num_layers,
        "layer_types": [kinds[m] for m in c.layer_mixers()], "hidden_act": "silu",
        "attention_bias": False, "num_attention_heads": a.get("attn_heads") or c.num_heads,
        "num_key_value_heads": a.get("num_kv_heads") or a.get("attn_heads") or c.num_heads,
        "head_dim": a.get("head_dim") or c.d_model // (a.get("attn_heads") or c.num_heads),
        "rope_parameters": {"rope_type": "default", "rope_theta": a.get("rope_theta", 10000.0),
                            "partial_rotary_factor": a["rotary_dim"] / a["head_dim"]},
        "linear_key_head_dim": K, "linear_value_head_dim": int(K * g.get("expand_v", 2.0)),
        "linear_num_key_heads": g.get("num_kv_heads") or c.num_heads,
        "linear_num_value_heads": c.num_heads, "linear_conv_kernel_dim": g.get("conv_size", 4),
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "dtype": c.param_dtype, "mlp_only_layers": [], "norm_topk_prob": True,
        "num_experts": c.num_experts if moe else 0, "decoder_sparse_step": c.moe_every,
        "num_experts_per_tok": c.top_k, "moe_intermediate_size": c.ff_width,
        "intermediate_size": c.ff_width, "shared_expert_intermediate_size": c.moe_shared}


def _mlp(prefix: str, path: tuple) -> dict:
    return {f"{prefix}.{n}_proj.weight": (path + (f"w_{n}", "kernel"), "linear")
            for n in ("gate", "up", "down")}


def tensors(c: LMConfig, hf: dict | None = None) -> dict:
    hf = to_hf(c)
    Hk, H = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
    K, V, r = hf["linear_key_head_dim"], hf["linear_value_head_dim"], H // Hk
    qkvz = fused_rows(Hk, (K, K, r * V, r * V))
    ba = fused_rows(Hk, (r, r))
    t = {"model.embed_tokens.weight": (("embed",), "same"),
         "model.norm.weight": (("norm", "scale"), "same")}
    if not c.tie_embeddings:
        t["lm_head.weight"] = (("head",), "linear")
    for i, mixer in enumerate(c.layer_mixers()):
        p, b = f"model.layers.{i}.", ("blocks", i)
        m = b + ("mixer",)
        t[p + "input_layernorm.weight"] = (b + ("norm1", "scale"), "same")
        t[p + "post_attention_layernorm.weight"] = (b + ("norm2", "scale"), "same")
        if mixer == "gated_deltanet":
            a = p + "linear_attn."
            t[a + "in_proj_qkvz.weight"] = tuple(
                Piece(m + (n, "kernel"), "linear", rows)
                for n, rows in zip(("q_proj", "k_proj", "v_proj", "g_proj"), qkvz, strict=True))
            t[a + "in_proj_ba.weight"] = (Piece(m + ("b_proj", "kernel"), "linear", ba[0]),
                                          Piece(m + ("decay", "proj", "kernel"), "linear", ba[1]))
            t[a + "conv1d.weight"] = (m + ("conv", "weight"), "conv")
            t[a + "dt_bias"] = (m + ("decay", "dt_bias"), "same")
            t[a + "A_log"] = (m + ("decay", "A_log"), "same")
            t[a + "norm.weight"] = (m + ("o_norm", "scale"), "same")
            t[a + "out_proj.weight"] = (m + ("o_proj", "kernel"), "linear")
        else:
            a = p + "self_attn."
            for n in ("q", "k", "v", "o"):
                t[a + f"{n}_proj.weight"] = (m + (f"{n}_proj", "kernel"), "linear")
            for n in ("q", "k"):
                t[a + f"{n}_norm.weight"] = (m + (f"{n}_norm", "scale"), "same")
        f = b + ("ffn",)
        if c.layer_ffn(i) == "mlp":
            t.update(_mlp(p + "mlp", f))
            continue
        t[p + "mlp.gate.weight"] = (f + ("routed", "router", "kernel"), "linear")
        for e in range(c.num_experts):
            for n in ("gate", "up", "down"):
                t[p + f"mlp.experts.{e}.{n}_proj.weight"] = (
                    Piece(f + ("routed", f"w_{n}"), "linear", index=e),)
        t.update(_mlp(p + "mlp.shared_expert", f + ("shared",)))
        t[p + "mlp.shared_expert_gate.weight"] = (f + ("shared_gate", "kernel"), "linear")
    return t


def matches(c: LMConfig) -> bool:
    return (set(c.layer_mixers()) <= set(_KINDS.values()) and c.norm_offset == 1.0
            and c.ffn in ("moe", "mlp") and (c.ffn == "mlp" or c.moe_shared > 0))


QWEN3_NEXT = Family(NAME, "qwen3_next", to_lm, to_hf, tensors, matches)
