"""Mamba (`MambaForCausalLM`) and Mamba-2 (`Mamba2ForCausalLM`) checkpoints.

Both stack blocks of RMSNorm + mixer with no MLP (`LMConfig(ffn="none")`), a final RMSNorm
(`norm_f`) and a head tied to the embedding unless `tie_word_embeddings` is false. The mixers are
`linear_jax.layers.Mamba` and `Mamba2`; Mamba-2's gated norm normalises per group of B and C
(`norm_groups = n_groups`), as the reference code does.

Not expressible, so refused by name: biases on in/out projections (`use_bias`), a conv without
bias (`use_conv_bias`), activations other than silu, and Mamba-2's `time_step_limit` other than
(0, inf). `residual_in_fp32` is read and ignored: our residual stream is in the compute dtype,
which is the same thing for float32 models (bfloat16 ones differ in rounding only).
"""

from __future__ import annotations

import math

from linear_jax.hub.family import Family, Fields
from linear_jax.models import LMConfig

# Initialisation-only and implementation-choice fields: they do not change the forward.
_INIT = ("initializer_range", "rescale_prenorm_residual", "time_step_scale", "time_step_min",
         "time_step_max", "time_step_floor", "time_step_init_scheme", "use_mambapy",
         "use_associative_scan", "residual_in_fp32")
_BACKBONE = "backbone"


def _common(f: Fields, mixer: str, num_heads: int, options: dict, **kw) -> LMConfig:
    f.expect("use_bias", False)
    f.expect("use_conv_bias", True)
    f.expect("hidden_act", "silu")
    config = LMConfig(
        vocab_size=f.take("vocab_size", kind=int), d_model=f.take("hidden_size", kind=int),
        num_layers=f.take("num_hidden_layers", kind=int), num_heads=num_heads, mixer=mixer,
        ffn="none", tie_embeddings=bool(f.take("tie_word_embeddings", kw.pop("tie"))),
        norm_eps=float(f.take("layer_norm_epsilon", 1e-5)), param_dtype=f.param_dtype(),
        mixer_options={mixer: options}, **kw)
    f.done()
    return config


def mamba_config(hf: dict) -> LMConfig:
    f = Fields(hf, "MambaForCausalLM", _INIT)
    d, expand = f.take("hidden_size", kind=int), f.take("expand", 2, kind=int)
    f.expect("intermediate_size", expand * d)
    rank = f.take("time_step_rank", "auto")
    options = dict(d_state=f.take("state_size", 16, kind=int), d_conv=f.take("conv_kernel", 4,
                   kind=int), expand=expand, dt_rank=math.ceil(d / 16) if rank == "auto" else rank)
    return _common(f, "mamba", 1, options, tie=True)


def mamba2_config(hf: dict) -> LMConfig:
    f = Fields(hf, "Mamba2ForCausalLM", _INIT + ("time_step_rank",))
    d, expand = f.take("hidden_size", kind=int), f.take("expand", 2, kind=int)
    H, P = f.take("num_heads", 128, kind=int), f.take("head_dim", 64, kind=int)
    if H * P != expand * d:
        raise ValueError(f"Mamba2ForCausalLM: config fields num_heads * head_dim = {H * P} must "
                         f"equal expand * hidden_size = {expand * d}")
    if d % H:
        raise ValueError(f"Mamba2ForCausalLM: config field num_heads={H} must divide "
                         f"hidden_size={d} here (LMConfig's heads divide d_model)")
    G = f.take("n_groups", 8, kind=int)
    f.expect("time_step_limit", (0.0, math.inf))
    options = dict(d_state=f.take("state_size", 128, kind=int), d_conv=f.take(
        "conv_kernel", 4, kind=int), expand=expand, num_groups=G, norm_groups=G,
        norm_eps=float(f.take("layer_norm_epsilon", 1e-5)))
    return _common(f, "mamba2", H, options, tie=False,
                   chunk_size=f.take("chunk_size", 256, kind=int))


def _hf_common(c: LMConfig, arch: str, model_type: str, mixer: str) -> tuple[dict, dict]:
    o = c.options(mixer)
    return o, {
        "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "num_hidden_layers": c.num_layers, "expand": o.get("expand", 2),
        "conv_kernel": o.get("d_conv", 4), "layer_norm_epsilon": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings, "dtype": c.param_dtype, "use_bias": False,
        "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True}


def mamba_hf(c: LMConfig) -> dict:
    o, hf = _hf_common(c, "MambaForCausalLM", "mamba", "mamba")
    return {**hf, "state_size": o.get("d_state", 16), "time_step_rank": o.get(
        "dt_rank") or math.ceil(c.d_model / 16), "intermediate_size": hf["expand"] * c.d_model}


def mamba2_hf(c: LMConfig) -> dict:
    o, hf = _hf_common(c, "Mamba2ForCausalLM", "mamba2", "mamba2")
    return {**hf, "state_size": o.get("d_state", 16), "num_heads": c.num_heads,
            "head_dim": hf["expand"] * c.d_model // c.num_heads, "n_groups": o.get(
                "num_groups", 1), "chunk_size": c.chunk_size,
            "time_step_limit": [0.0, {"__float__": "Infinity"}]}


def _ends(c: LMConfig) -> dict:
    t = {f"{_BACKBONE}.embeddings.weight": (("embed",), "same"),
         f"{_BACKBONE}.norm_f.weight": (("norm", "scale"), "same")}
    if not c.tie_embeddings:
        t["lm_head.weight"] = (("head",), "linear")      # [V, D] stored, ours [D, V]
    return t


def _layers(c: LMConfig, mixer: tuple) -> dict:
    """The embedding and head tensors, then per layer its norm and each (checkpoint name, our
    path under the layer's mixer, layout) of `mixer`."""
    t = _ends(c)
    for i in range(c.num_layers):
        p, m = f"{_BACKBONE}.layers.{i}.", ("blocks", i, "mixer")
        t[p + "norm.weight"] = (("blocks", i, "norm1", "scale"), "same")
        for name, path, layout in mixer:
            t[p + "mixer." + name] = (m + path, layout)
    return t


def mamba_tensors(c: LMConfig, hf: dict | None = None) -> dict:
    return _layers(c, (
        ("in_proj.weight", ("in_proj", "kernel"), "linear"),
        ("conv1d.weight", ("conv", "weight"), "conv"),
        ("conv1d.bias", ("conv", "bias"), "same"),
        ("x_proj.weight", ("x_proj", "kernel"), "linear"),
        ("dt_proj.weight", ("dt_proj", "kernel"), "linear"),
        ("dt_proj.bias", ("dt_proj", "bias"), "same"),
        ("A_log", ("A_log",), "same"), ("D", ("D",), "same"),
        ("out_proj.weight", ("out_proj", "kernel"), "linear")))


def mamba2_tensors(c: LMConfig, hf: dict | None = None) -> dict:
    return _layers(c, (
        ("in_proj.weight", ("in_proj", "kernel"), "linear"),
        ("conv1d.weight", ("conv", "weight"), "conv"),
        ("conv1d.bias", ("conv", "bias"), "same"),
        ("dt_bias", ("dt_bias",), "same"), ("A_log", ("A_log",), "same"),
        ("D", ("D",), "same"), ("norm.weight", ("norm", "scale"), "same"),
        ("out_proj.weight", ("out_proj", "kernel"), "linear")))


def _only(mixer: str):
    def matches(c: LMConfig) -> bool:
        o = c.options(mixer)
        return (set(c.layer_mixers()) == {mixer} and c.ffn == "none"
                and (mixer != "mamba2" or (o.get("norm_groups", 1) == o.get("num_groups", 1)
                                           and o.get("norm_eps", 1e-6) == c.norm_eps)))
    return matches


MAMBA = Family("MambaForCausalLM", "mamba", mamba_config, mamba_hf, mamba_tensors,
               _only("mamba"))
MAMBA2 = Family("Mamba2ForCausalLM", "mamba2", mamba2_config, mamba2_hf, mamba2_tensors,
                _only("mamba2"))
