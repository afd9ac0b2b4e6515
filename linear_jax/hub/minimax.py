"""MiniMax-01 (`MiniMaxForCausalLM`): lightning-attention and softmax-attention layers
(`layer_types`), each followed by a top-k mixture of experts, in MiniMax's block

    h = RMSNorm(h); h = alpha_m h + beta_m mixer(h); h = RMSNorm(h); h = alpha_f h + beta_f moe(h)

(`LMConfig(residual="normed")`, the factors per layer type in `residual_scales`).

    linear_attention -> `MiniMaxLightning` (per-head [q | k | v] fused in `qkv_proj`, silu, fixed
                        ALiBi-like decays per layer, full-width RMSNorm, sigmoid gate)
    full_attention   -> `Attention` (GQA, RoPE over the whole head)
    block_sparse_moe -> `MoE` (softmax router, top-k renormalised; experts w1, w3, w2)

The checkpoint also stores each lightning layer's decay tables (`slope_rate`, `query_decay`,
`key_decay`, `diagonal_decay`); they follow from the config and `block_size` (our chunk size), so
they are checked on load and written on save. Refused by name: a `sliding_window`, RoPE types
other than "default", activations other than silu.
"""

from __future__ import annotations

import numpy as np

from linear_jax.hub.family import (
    MIXTRAL_EXPERT,
    Family,
    Fields,
    Piece,
    decoder,
    experts,
    fused_rows,
    linears,
)
from linear_jax.layers.minimax import minimax_decays
from linear_jax.models import LMConfig

NAME = "MiniMaxForCausalLM"
_HARMLESS = ("max_position_embeddings", "attention_dropout", "output_router_logits",
             "router_aux_loss_coef", "router_jitter_noise")
_KINDS = {"linear_attention": "minimax_lightning", "full_attention": "attention"}
_SCALES = {"minimax_lightning": "linear_attn", "attention": "full_attn", "ffn": "mlp"}


def to_lm(hf: dict) -> LMConfig:
    f = Fields(hf, NAME, _HARMLESS)
    d, L = f.take("hidden_size", kind=int), f.take("num_hidden_layers", kind=int)
    types = f.take("layer_types", ["full_attention"] * L)
    if len(types) != L or set(types) - set(_KINDS):
        raise ValueError(f"{NAME}: config field layer_types must list {L} of {sorted(_KINDS)}, "
                         f"got {types!r}")
    f.expect("hidden_act", "silu")
    if f.optional("sliding_window") is not None:
        raise ValueError(f"{NAME}: config field sliding_window={hf['sliding_window']!r} is not "
                         f"supported (only null)")
    rope = dict(f.take("rope_parameters", {"rope_type": "default", "rope_theta": 1e6}))
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        raise ValueError(f"{NAME}: config field rope_parameters={rope!r} is not supported "
                         f"(only the default RoPE over the whole head)")
    H = f.take("num_attention_heads", 32, kind=int)
    if d % H:
        raise ValueError(f"{NAME}: config field num_attention_heads={H} must divide "
                         f"hidden_size={d}")
    head_dim = f.optional("head_dim") or d // H
    scales = {ours: (float(f.take(f"{theirs}_alpha_factor", 1)),
                     float(f.take(f"{theirs}_beta_factor", 1))) for ours, theirs in _SCALES.items()}
    options = {"minimax_lightning": {"head_dim": head_dim},
               "attention": {"num_kv_heads": f.take("num_key_value_heads", H, kind=int),
                             "head_dim": head_dim,
                             "rope_theta": float(rope.get("rope_theta", 1e6))}}
    config = LMConfig(
        vocab_size=f.take("vocab_size", kind=int), d_model=d, num_layers=L, num_heads=H,
        layers=tuple(_KINDS[t] for t in types), mixer_options=options, ffn="moe",
        d_ff=f.take("intermediate_size", 14336, kind=int),
        num_experts=f.take("num_local_experts", 8, kind=int),
        top_k=f.take("num_experts_per_tok", 2, kind=int), residual="normed",
        residual_scales=scales, norm_eps=float(f.take("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(f.take("tie_word_embeddings", False)), param_dtype=f.param_dtype(),
        chunk_size=f.take("block_size", 256, kind=int))
    f.done()
    return config


def to_hf(c: LMConfig) -> dict:
    kinds = {v: k for k, v in _KINDS.items()}
    a = c.options("attention")
    hf = {"architectures": [NAME], "model_type": "minimax", "vocab_size": c.vocab_size,
          "hidden_size": c.d_model, "num_hidden_layers": c.num_layers,
          "layer_types": [kinds[m] for m in c.layer_mixers()], "hidden_act": "silu",
          "num_attention_heads": c.num_heads,
          "num_key_value_heads": a.get("num_kv_heads") or c.num_heads,
          "head_dim": a.get("head_dim") or c.d_model // c.num_heads,
          "rope_parameters": {"rope_type": "default", "rope_theta": a.get("rope_theta", 1e4)},
          "intermediate_size": c.ff_width, "num_local_experts": c.num_experts,
          "num_experts_per_tok": c.top_k, "rms_norm_eps": c.norm_eps, "sliding_window": None,
          "tie_word_embeddings": c.tie_embeddings, "dtype": c.param_dtype,
          "block_size": c.chunk_size}
    for ours, theirs in _SCALES.items():
        hf[f"{theirs}_alpha_factor"], hf[f"{theirs}_beta_factor"] = c.scales(ours)
    return hf


def tensors(c: LMConfig, hf: dict | None = None) -> dict:
    H = c.num_heads
    Dh = c.options("minimax_lightning").get("head_dim") or c.d_model // H
    qkv = fused_rows(H, (Dh, Dh, Dh))

    def layer(i: int, mixer: str, p: str, b: tuple) -> dict:
        m, a, ffn = b + ("mixer",), p + "self_attn.", b + ("ffn",)
        if mixer == "minimax_lightning":
            fused = tuple(Piece(m + (n, "kernel"), "linear", r) for n, r in
                          zip(("q_proj", "k_proj", "v_proj"), qkv, strict=True))
            t = {a + "qkv_proj.weight": fused,
                 a + "output_gate.weight": (m + ("g_proj", "kernel"), "linear"),
                 a + "norm.weight": (m + ("norm", "scale"), "same"),
                 a + "out_proj.weight": (m + ("o_proj", "kernel"), "linear")}
        else:
            t = linears(a, m, [(f"{n}_proj", f"{n}_proj") for n in "qkvo"])
        moe = p + "block_sparse_moe."
        t[moe + "gate.weight"] = (ffn + ("router", "kernel"), "linear")
        return {**t, **experts(moe, ffn, c.num_experts, MIXTRAL_EXPERT)}

    return decoder(c, layer)


def derived(c: LMConfig) -> dict:
    """The decay tables MiniMax's lightning layers keep as buffers, as it computes them."""
    out, n = {}, np.arange(1, c.chunk_size + 1, dtype=np.float32)[:, None]
    for i, mixer in enumerate(c.layer_mixers()):
        if mixer != "minimax_lightning":
            continue
        s = -minimax_decays(c.num_heads, i, c.num_layers)[:, None, None]        # [H, 1, 1]
        diff = n - n.T
        diag = np.where(diff >= 0, np.exp(-s * np.maximum(diff, 0)), 0.0)[None]
        a = f"model.layers.{i}.self_attn."
        out.update({a + "slope_rate": s, a + "query_decay": np.exp(-s * n),
                    a + "key_decay": np.exp(-s * (c.chunk_size - n)),
                    a + "diagonal_decay": diag.astype(np.float32)})
    return {k: v.astype(np.float32) for k, v in out.items()}


def matches(c: LMConfig) -> bool:
    return (set(c.layer_mixers()) <= set(_KINDS.values()) and c.residual == "normed"
            and c.ffn == "moe" and c.moe_shared == 0)


MINIMAX = Family(NAME, "minimax", to_lm, to_hf, tensors, matches, derived)
