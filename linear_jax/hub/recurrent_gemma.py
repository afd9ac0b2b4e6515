"""RecurrentGemma (`RecurrentGemmaForCausalLM`, Griffin): pre-norm residual blocks of a temporal
mixer and a GeGLU MLP, the mixers following `block_types` cyclically over the layers:

    recurrent -> `RGLRU` (Griffin's recurrent block: a GeLU gate branch times conv + RG-LRU)
    attention -> `Attention` with a sliding window of `attention_window_size` (a constant-size
                 decoding cache), MQA/GQA, RoPE on the first `partial_rotary_factor` of each
                 head, a bias on the output projection only

The norms are Gemma's zero-centred RMSNorm (`LMConfig.norm_offset = 1`), the MLP is GeGLU with
biases of width intermediate_size / 2, the embeddings are scaled by sqrt(hidden_size) rounded to
bfloat16 (transformers keeps the factor as a bfloat16 buffer, so that is the factor it
multiplies by), the head is the embedding (or `lm_head.weight` when `tie_word_embeddings` is
false) and the logits are soft-capped by `logits_soft_cap`. Older configs keep `rope_theta` and
`partial_rotary_factor` at the top level; both forms load.

Refused by name: `attention_bias`, activations other than gelu_pytorch_tanh, RoPE types other
than "default", a `head_dim` other than hidden_size / num_attention_heads, block types other
than "recurrent" and "attention", `embeddings_scale_by_sqrt_dim = false`.
"""

from __future__ import annotations

import math

import ml_dtypes

from linear_jax.hub.family import Family, Fields
from linear_jax.models import LMConfig

NAME = "RecurrentGemmaForCausalLM"
_HARMLESS = ("attention_dropout", "w_init_variance_scale", "final_w_init_variance_scale")
_KINDS = {"recurrent": "rglru", "attention": "attention"}
_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


def embed_scale(d_model: int) -> float:
    """sqrt(d_model) as transformers multiplies by it: rounded to bfloat16."""
    return float(ml_dtypes.bfloat16(math.sqrt(d_model)))


def to_lm(hf: dict) -> LMConfig:
    f = Fields(hf, NAME, _HARMLESS)
    d, L = f.take("hidden_size", kind=int), f.take("num_hidden_layers", kind=int)
    H = f.take("num_attention_heads", 10, kind=int)
    if d % H:
        raise ValueError(f"{NAME}: config field num_attention_heads={H} must divide "
                         f"hidden_size={d}")
    head_dim = f.expect("head_dim", d // H)
    f.expect("attention_bias", False)
    f.expect("hidden_activation", "gelu_pytorch_tanh")
    f.expect("embeddings_scale_by_sqrt_dim", True)
    types = f.take("block_types", ["recurrent", "recurrent", "attention"])
    if not types or set(types) - set(_KINDS):
        raise ValueError(f"{NAME}: config field block_types must list {sorted(_KINDS)}, got "
                         f"{types!r}")
    given = dict(f.optional("rope_parameters") or {})
    for k in ("rope_theta", "partial_rotary_factor"):       # older configs: top level
        v = f.optional(k)
        if v is not None and given.setdefault(k, v) != v:
            raise ValueError(f"{NAME}: config field {k}={v!r} disagrees with "
                             f"rope_parameters[{k!r}]={given[k]!r}")
    rope = {**_ROPE, **given}
    rotary = int(head_dim * rope["partial_rotary_factor"])
    if rope["rope_type"] != "default" or set(rope) - set(_ROPE):
        raise ValueError(f"{NAME}: config field rope_parameters={rope!r} is not supported "
                         f"(only the default RoPE, with rope_theta and partial_rotary_factor)")
    if rotary < 2 or rotary % 2:
        raise ValueError(f"{NAME}: config field partial_rotary_factor="
                         f"{rope['partial_rotary_factor']} gives {rotary} rotary channels of "
                         f"head_dim={head_dim}; they must be a positive even number")
    width = f.optional("lru_width") or d
    if width % H:
        raise ValueError(f"{NAME}: config field lru_width={width} must be a multiple of "
                         f"num_attention_heads={H} (the RG-LRU gates are block-diagonal)")
    options = {
        "rglru": dict(lru_width=width, conv_size=f.take("conv1d_width", 4, kind=int)),
        "attention": dict(num_kv_heads=f.take("num_key_value_heads", H, kind=int),
                          window=f.take("attention_window_size", 2048, kind=int),
                          rotary_dim=rotary, rope_theta=float(rope["rope_theta"]),
                          out_bias=True),
    }
    config = LMConfig(
        vocab_size=f.take("vocab_size", kind=int), d_model=d, num_layers=L, num_heads=H,
        layers=tuple(_KINDS[types[i % len(types)]] for i in range(L)), mixer_options=options,
        ffn="mlp", d_ff=f.take("intermediate_size", 3 * d, kind=int) // 2,
        ffn_activation="gelu_tanh", ffn_bias=True,
        tie_embeddings=bool(f.take("tie_word_embeddings", True)),
        norm_eps=float(f.take("rms_norm_eps", 1e-6)), norm_offset=1.0,
        logit_soft_cap=float(f.take("logits_soft_cap", 30.0)), embed_scale=embed_scale(d),
        param_dtype=f.param_dtype())
    f.done()
    return config


def to_hf(c: LMConfig) -> dict:
    r, a = c.options("rglru"), c.options("attention")
    kinds = {v: k for k, v in _KINDS.items()}
    names = [kinds[m] for m in c.layer_mixers()]
    L, head_dim = c.num_layers, c.d_model // c.num_heads
    period = next(p for p in range(1, L + 1) if all(names[i] == names[i % p] for i in range(L)))
    return {
        "architectures": [NAME], "model_type": "recurrent_gemma", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "num_hidden_layers": L, "num_attention_heads": c.num_heads,
        "num_key_value_heads": a.get("num_kv_heads") or c.num_heads, "head_dim": head_dim,
        "block_types": names[:period], "lru_width": r.get("lru_width") or c.d_model,
        "conv1d_width": r.get("conv_size", 4), "attention_window_size": a.get("window") or 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.get("rope_theta", 10000.0),
                            "partial_rotary_factor": (a.get("rotary_dim") or head_dim)
                            / head_dim},
        "intermediate_size": 2 * c.ff_width, "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False, "logits_soft_cap": c.logit_soft_cap,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "dtype": c.param_dtype}


def tensors(c: LMConfig, hf: dict | None = None) -> dict:
    t = {"model.embed_tokens.weight": (("embed",), "same"),
         "model.final_norm.weight": (("norm", "scale"), "same")}
    if not c.tie_embeddings:
        t["lm_head.weight"] = (("head",), "linear")

    def linear(name: str, path: tuple, bias: bool = True):
        t[name + ".weight"] = (path + ("kernel",), "linear")
        if bias:
            t[name + ".bias"] = (path + ("bias",), "same")

    for i, mixer in enumerate(c.layer_mixers()):
        p, b = f"model.layers.{i}.", ("blocks", i)
        m, tb = b + ("mixer",), p + "temporal_block."
        t[p + "temporal_pre_norm.weight"] = (b + ("norm1", "scale"), "same")
        t[p + "channel_pre_norm.weight"] = (b + ("norm2", "scale"), "same")
        for n in ("gate", "up", "down"):
            linear(p + f"mlp_block.{n}_proj", b + ("ffn", f"w_{n}"))
        if mixer == "rglru":
            for theirs, ours in (("linear_x", "x_proj"), ("linear_y", "y_proj"),
                                 ("linear_out", "o_proj")):
                linear(tb + theirs, m + (ours,))
            t[tb + "conv_1d.weight"] = (m + ("conv", "weight"), "conv")
            t[tb + "conv_1d.bias"] = (m + ("conv", "bias"), "same")
            for n in ("input_gate_weight", "input_gate_bias", "recurrent_gate_weight",
                      "recurrent_gate_bias", "recurrent_param"):
                t[tb + "rg_lru." + n] = (m + (n,), "same")
        else:
            for n in "qkv":
                linear(tb + f"{n}_proj", m + (f"{n}_proj",), bias=False)
            linear(tb + "o_proj", m + ("o_proj",))
    return t


def matches(c: LMConfig) -> bool:
    a, r = c.options("attention"), c.options("rglru")
    return (set(c.layer_mixers()) <= set(_KINDS.values()) and c.ffn == "mlp"
            and c.ffn_activation == "gelu_tanh" and c.ffn_bias and c.norm_offset == 1.0
            and c.residual == "pre" and c.logit_soft_cap is not None
            and c.embed_scale == embed_scale(c.d_model)
            and ("attention" not in c.layer_mixers() or (
                a.get("window") is not None and a.get("out_bias") and not a.get("block_size")
                and a.get("head_dim") in (None, c.d_model // c.num_heads)))
            and r.get("c", 8.0) == 8.0)


RECURRENT_GEMMA = Family(NAME, "recurrent_gemma", to_lm, to_hf, tensors, matches)
