"""Qwen's Gated DeltaNet hybrids: Qwen3-Next (`Qwen3NextForCausalLM`) and Qwen3.5, dense
(`Qwen3_5ForCausalLM`) or MoE (`Qwen3_5MoeForCausalLM`), each also as released, inside its
multimodal model (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`).
Gated DeltaNet and gated softmax attention layers (`layer_types`), each followed by a mixture of
experts with a shared expert or a SwiGLU MLP:

    linear_attention -> `GatedDeltaNet` (grouped: `linear_num_key_heads` key heads serve
                        `linear_num_value_heads` value heads; l2-normalised q, k; gated norm)
    full_attention   -> `GatedAttention` (GQA, q/k RMS norms, partial RoPE, sigmoid output gate)
    mlp              -> `SharedExpertMoE` (softmax top-k, renormalised, + sigmoid-gated shared
                        expert); Qwen3-Next with `num_experts = 0` and dense Qwen3.5: SwiGLU `MLP`

The block and final norms are zero-centred (`LMConfig.norm_offset = 1`: scale 1 + w, w stored).
The two generations compute the same functions and differ in how they are stored, which `_Format`
holds per architecture:

- Qwen3-Next fuses per key head [q | k | v | z] into `in_proj_qkvz` and [b | a] into
  `in_proj_ba`; Qwen3.5 stores `in_proj_qkv` ([q | k | v], each whole), `in_proj_z`, `in_proj_b`
  and `in_proj_a`. The rows are split into our separate projections on load and fused on save.
- Qwen3.5 is dense or MoE by architecture, every layer alike; Qwen3-Next by `num_experts`, MoE
  on every `decoder_sparse_step`-th layer.
- Qwen3.5's RoPE is multimodal (`mrope_section`: frequency bands follow time, height or width
  positions); a text token has one position on all three, which is the 1-D RoPE computed here.
- The multimodal checkpoints nest the language model's config under `text_config` (taking
  `tie_word_embeddings` and `dtype` from the top level, as transformers does) and its tensors
  under `model.language_model.`. Only the language model loads: the vision tower
  (`model.visual.*`) stays on disk, as does every format's multi-token-prediction head
  (`mtp.*`); `save` writes the text-only LM, which transformers also builds from these.

Refused by name: `attention_bias`, RoPE types other than "default", `norm_topk_prob = false`,
`mlp_only_layers`, `attn_output_gate = false`, and a Qwen3-Next `decoder_sparse_step > 1` whose
dense layers are wider than the experts (`intermediate_size != moe_intermediate_size`: LMConfig
has one d_ff).
"""

from __future__ import annotations

import dataclasses
from functools import partial

from linear_jax.hub.family import (
    SWIGLU,
    Family,
    Fields,
    Piece,
    decoder,
    experts,
    fused_rows,
    linears,
)
from linear_jax.models import LMConfig

_HARMLESS = ("max_position_embeddings", "attention_dropout", "output_router_logits",
             "router_aux_loss_coef",
             # the multi-token-prediction head's, which is not loaded
             "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings")
# a multimodal config's top level beside text_config: the vision tower's, which is not loaded
_VISION = ("vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
           "vision_end_token_id")
_KINDS = {"linear_attention": "gated_deltanet", "full_attention": "gated_attention"}
_ROPE = {"rope_type", "rope_theta", "partial_rotary_factor"}


@dataclasses.dataclass(frozen=True)
class _Format:
    name: str                          # the architecture
    model_type: str
    qwen3_5: bool                      # split projections, MRoPE fields, ffn by architecture
    ffn: str | None = None             # Qwen3.5's "mlp" or "moe"; Qwen3-Next: num_experts says
    text_type: str | None = None       # multimodal: the model_type of its text_config
    saves_as: str | None = None

    @property
    def prefix(self) -> str:
        return "model.language_model." if self.text_type else "model."


def _language_model(fmt: _Format, hf: dict) -> dict:
    """The language model's config: config.json, or a multimodal one's `text_config` with the top
    level's `tie_word_embeddings` and `dtype` (transformers ties by the top level's field)."""
    if fmt.text_type is None:
        return hf
    top = Fields(hf, fmt.name, _VISION)
    text = top.take("text_config")
    if not isinstance(text, dict) or text.get("model_type", fmt.text_type) != fmt.text_type:
        raise ValueError(f"{fmt.name}: config field text_config must be a {fmt.text_type!r} "
                         f"config")
    text = dict(text, tie_word_embeddings=top.take("tie_word_embeddings", False))
    if "dtype" in hf or "torch_dtype" in hf:
        text["dtype"] = hf.get("dtype", hf.get("torch_dtype"))
    top.done()
    return text


def _ffn(f: Fields, fmt: _Format) -> dict:
    """The feed-forward fields of LMConfig."""
    f.expect("mlp_only_layers", [])
    f.expect("norm_topk_prob", True)
    if fmt.ffn == "mlp":
        return dict(ffn="mlp", d_ff=f.take("intermediate_size", 12288, kind=int))
    if fmt.ffn == "moe":        # every layer: no decoder_sparse_step, no dense intermediate_size
        E, width = f.take("num_experts", 256, kind=int), None
        step = f.expect("decoder_sparse_step", 1)
    else:
        E, step = f.take("num_experts", 512), f.take("decoder_sparse_step", 1, kind=int)
        width = f.take("intermediate_size", 5632, kind=int)
    top_k = f.take("num_experts_per_tok", 8 if fmt.ffn == "moe" else 10, kind=int)
    moe = dict(ffn="moe", d_ff=f.take("moe_intermediate_size", 512, kind=int), num_experts=E,
               moe_every=step, top_k=top_k,
               moe_shared=f.take("shared_expert_intermediate_size", 512, kind=int))
    if not E:
        return dict(ffn="mlp", d_ff=width)
    if step > 1 and width != moe["d_ff"]:
        raise ValueError(f"{fmt.name}: config fields intermediate_size={width} and "
                         f"moe_intermediate_size={moe['d_ff']} must match when "
                         f"decoder_sparse_step={step} > 1 (one d_ff for MLP and experts)")
    return moe


def to_lm(fmt: _Format, hf: dict) -> LMConfig:
    f = Fields(_language_model(fmt, hf), fmt.name, _HARMLESS)
    d, L = f.take("hidden_size", kind=int), f.take("num_hidden_layers", kind=int)
    every = f.take("full_attention_interval", 4, kind=int)
    types = f.take("layer_types", ["linear_attention" if (i + 1) % every else "full_attention"
                                   for i in range(L)])
    bad = sorted({t for t in types if t not in _KINDS})
    if bad or len(types) != L:
        raise ValueError(f"{fmt.name}: config field layer_types must list {L} of "
                         f"{sorted(_KINDS)}, got {types!r}")
    f.expect("attention_bias", False)
    f.expect("attn_output_gate", True)
    f.expect("hidden_act", "silu")
    rope = dict(f.take("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}))
    known = _ROPE | ({"mrope_section", "mrope_interleaved"} if fmt.qwen3_5 else set())
    if rope.get("rope_type", "default") != "default" or set(rope) - known:
        raise ValueError(f"{fmt.name}: config field rope_parameters={rope!r} is not supported "
                         f"(only the default RoPE, with {sorted(known - {'rope_type'})})")
    head_dim = f.take("head_dim", 256, kind=int)
    K, V = f.take("linear_key_head_dim", 128, kind=int), f.take("linear_value_head_dim", 128,
                                                                  kind=int)
    Hk, H = f.take("linear_num_key_heads", 16, kind=int), f.take("linear_num_value_heads", 32,
                                                                   kind=int)
    if d % H:
        raise ValueError(f"{fmt.name}: config field linear_num_value_heads={H} must divide "
                         f"hidden_size={d} here (LMConfig's heads divide d_model)")
    eps = float(f.take("rms_norm_eps", 1e-6))
    options = {
        "gated_deltanet": dict(head_dim=K, expand_v=V / K, num_kv_heads=Hk, norm_eps=eps,
                               conv_size=f.take("linear_conv_kernel_dim", 4, kind=int)),
        # transformers' default partial_rotary_factor is 0.25 for both generations
        "gated_attention": dict(attn_heads=f.take("num_attention_heads", 16, kind=int),
                                num_kv_heads=f.take("num_key_value_heads", 2, kind=int),
                                head_dim=head_dim, norm_eps=eps,
                                rope_theta=float(rope.get("rope_theta", 10000.0)),
                                rotary_dim=int(head_dim * rope.get("partial_rotary_factor",
                                                                   0.25))),
    }
    config = LMConfig(
        vocab_size=f.take("vocab_size", kind=int), d_model=d, num_layers=L, num_heads=H,
        layers=tuple(_KINDS[t] for t in types), mixer_options=options,
        tie_embeddings=bool(f.take("tie_word_embeddings", False)), norm_eps=eps,
        norm_offset=1.0, param_dtype=f.param_dtype(), **_ffn(f, fmt))
    f.done()
    return config


def _dims(c: LMConfig) -> tuple[int, int, int, int]:
    """(key heads, value heads, key head dim, value head dim) of the Gated DeltaNet layers."""
    g = c.options("gated_deltanet")
    K = g.get("head_dim") or c.d_model // c.num_heads
    return g.get("num_kv_heads") or c.num_heads, c.num_heads, K, int(K * g.get("expand_v", 2.0))


def to_hf(fmt: _Format, c: LMConfig) -> dict:
    a = c.options("gated_attention")
    Hk, H, K, V = _dims(c)
    kinds = {v: k for k, v in _KINDS.items()}
    hf = {
        "architectures": [fmt.name], "model_type": fmt.model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "num_hidden_layers": c.num_layers,
        "layer_types": [kinds[m] for m in c.layer_mixers()], "hidden_act": "silu",
        "attention_bias": False, "num_attention_heads": a.get("attn_heads") or c.num_heads,
        "num_key_value_heads": a.get("num_kv_heads") or a.get("attn_heads") or c.num_heads,
        "head_dim": a.get("head_dim") or c.d_model // (a.get("attn_heads") or c.num_heads),
        "rope_parameters": {"rope_type": "default", "rope_theta": a.get("rope_theta", 10000.0),
                            "partial_rotary_factor": a["rotary_dim"] / a["head_dim"]},
        "linear_key_head_dim": K, "linear_value_head_dim": V, "linear_num_key_heads": Hk,
        "linear_num_value_heads": H, "linear_conv_kernel_dim": c.options("gated_deltanet").get(
            "conv_size", 4),
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "dtype": c.param_dtype}
    moe = dict(num_experts=c.num_experts, num_experts_per_tok=c.top_k,
               moe_intermediate_size=c.ff_width, shared_expert_intermediate_size=c.moe_shared)
    if fmt.ffn == "mlp":
        return {**hf, "intermediate_size": c.ff_width}
    if fmt.ffn == "moe":
        return {**hf, **moe}
    dense = c.ffn != "moe"
    return {**hf, **moe, "mlp_only_layers": [], "norm_topk_prob": True,
            "num_experts": 0 if dense else c.num_experts, "decoder_sparse_step": c.moe_every,
            "intermediate_size": c.ff_width}


def _projections(fmt: _Format, c: LMConfig, m: tuple) -> dict:
    """The input projections of a Gated DeltaNet layer (path `m`), by their names after
    `linear_attn.`."""
    Hk, H, K, V = _dims(c)
    q, k, v, z, b = (m + (n, "kernel") for n in ("q_proj", "k_proj", "v_proj", "g_proj",
                                                   "b_proj"))
    a = m + ("decay", "proj", "kernel")
    if fmt.qwen3_5:
        qkv = fused_rows(1, (Hk * K, Hk * K, H * V))
        return {"in_proj_qkv.weight": tuple(Piece(p, "linear", rows)
                                            for p, rows in zip((q, k, v), qkv, strict=True)),
                "in_proj_z.weight": (z, "linear"), "in_proj_b.weight": (b, "linear"),
                "in_proj_a.weight": (a, "linear")}
    r = H // Hk                                     # value heads per key head
    qkvz, ba = fused_rows(Hk, (K, K, r * V, r * V)), fused_rows(Hk, (r, r))
    return {"in_proj_qkvz.weight": tuple(Piece(p, "linear", rows)
                                         for p, rows in zip((q, k, v, z), qkvz, strict=True)),
            "in_proj_ba.weight": (Piece(b, "linear", ba[0]), Piece(a, "linear", ba[1]))}


def tensors(fmt: _Format, c: LMConfig, hf: dict | None = None) -> dict:
    def layer(i: int, mixer: str, p: str, b: tuple) -> dict:
        m, f = b + ("mixer",), b + ("ffn",)
        if mixer == "gated_deltanet":
            a = p + "linear_attn."
            t = {a + n: e for n, e in _projections(fmt, c, m).items()}
            t[a + "conv1d.weight"] = (m + ("conv", "weight"), "conv")
            t[a + "dt_bias"] = (m + ("decay", "dt_bias"), "same")
            t[a + "A_log"] = (m + ("decay", "A_log"), "same")
            t[a + "norm.weight"] = (m + ("o_norm", "scale"), "same")
            t[a + "out_proj.weight"] = (m + ("o_proj", "kernel"), "linear")
        else:
            a = p + "self_attn."
            t = linears(a, m, [(f"{n}_proj", f"{n}_proj") for n in "qkvo"])
            for n in ("q", "k"):
                t[a + f"{n}_norm.weight"] = (m + (f"{n}_norm", "scale"), "same")
        if c.layer_ffn(i) == "mlp":
            return {**t, **linears(p + "mlp.", f, SWIGLU)}
        t[p + "mlp.gate.weight"] = (f + ("routed", "router", "kernel"), "linear")
        t.update(experts(p + "mlp.", f + ("routed",), c.num_experts, SWIGLU))
        t.update(linears(p + "mlp.shared_expert.", f + ("shared",), SWIGLU))
        t[p + "mlp.shared_expert_gate.weight"] = (f + ("shared_gate", "kernel"), "linear")
        return t

    return decoder(c, layer, fmt.prefix)


def matches(fmt: _Format, c: LMConfig) -> bool:
    """Whether `to_hf` describes `c` (a multimodal format never does: saved as its text LM)."""
    ours = (set(c.layer_mixers()) <= set(_KINDS.values()) and c.norm_offset == 1.0
            and c.residual == "pre" and c.ffn_activation == "silu" and not c.ffn_bias
            and c.ffn_layers is None and not c.moe_options and c.moe_d_ff in (None, c.d_ff))
    moe = c.ffn == "moe" and c.moe_shared > 0
    if fmt.text_type is not None or not ours:
        return False
    if fmt.ffn == "mlp":
        return c.ffn == "mlp"
    if fmt.ffn == "moe":
        return moe and c.moe_every == 1
    return c.ffn == "mlp" or moe


def _family(fmt: _Format) -> Family:
    return Family(fmt.name, fmt.model_type, partial(to_lm, fmt), partial(to_hf, fmt),
                  partial(tensors, fmt), partial(matches, fmt),
                  ignored=("mtp.", "model.visual.") if fmt.qwen3_5 else ("mtp.",),
                  saves_as=fmt.saves_as)


QWEN3_NEXT = _family(_Format("Qwen3NextForCausalLM", "qwen3_next", qwen3_5=False))
QWEN3_5 = tuple(_family(f) for f in (
    _Format("Qwen3_5ForCausalLM", "qwen3_5_text", True, "mlp"),
    _Format("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", True, "moe"),
    _Format("Qwen3_5ForConditionalGeneration", "qwen3_5", True, "mlp", "qwen3_5_text",
            "Qwen3_5ForCausalLM"),
    _Format("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe", True, "moe",
            "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM")))
