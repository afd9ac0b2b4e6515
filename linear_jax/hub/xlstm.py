"""xLSTM (`xLSTMForCausalLM`, the xLSTM 7B architecture): pre-norm blocks of an mLSTM layer and a
SwiGLU feed-forward, a final RMSNorm, and logits soft-capped by c tanh(x / c).

The mixer is `linear_jax.layers.MLSTM` with the release's choices: gate pre-activations
soft-capped (`gate_soft_cap`), a per-head LayerNorm with a weight per head and channel
(`head_norm="layer"`), the normaliser's `eps`. The feed-forward width is transformers'
round_up(hidden_size * ffn_proj_factor, ffn_round_up_to_multiple_of). Both weight layouts load:
"single" (q, k, v, gates apart) and "fused" (their rows in one matrix); `save` writes "single".

Kernel choices (`mode`, `chunkwise_kernel`, `autocast_kernel_dtype`, ...) only change how the same
function is computed and are ignored: ours runs q, k, v in the model's dtype and the state in
float32. Refused by name: `use_bias`, `add_out_norm = false`, `v_dim_factor != 1`,
`embedding_dim != hidden_size`.
"""

from __future__ import annotations

from linear_jax.hub.family import Family, Fields, Piece, fused_rows
from linear_jax.models import LMConfig

NAME = "xLSTMForCausalLM"
_HARMLESS = ("chunkwise_kernel", "sequence_kernel", "step_kernel", "mode", "return_last_states",
             "autocast_kernel_dtype", "inference_state_dtype", "max_inference_chunksize",
             "norm_reduction_force_float32")


def _round_up(x, multiple: int) -> int:
    return int(((x + multiple - 1) // multiple) * multiple)


def to_lm(hf: dict) -> LMConfig:
    f = Fields(hf, NAME, _HARMLESS)
    d, L = f.take("hidden_size", kind=int), f.take("num_hidden_layers", kind=int)
    f.expect("embedding_dim", d)
    f.expect("num_blocks", L)
    f.expect("use_bias", False)
    f.expect("add_out_norm", True)
    f.expect("v_dim_factor", 1.0)
    f.take("weight_mode", "single")
    if hf.get("weight_mode", "single") not in ("single", "fused"):
        raise ValueError(f"{NAME}: config field weight_mode={hf['weight_mode']!r} is not "
                         f"supported (single or fused)")
    H = f.take("num_heads", 8, kind=int)
    if d % H:
        raise ValueError(f"{NAME}: config field num_heads={H} must divide hidden_size={d}")
    eps = float(f.take("norm_eps", 1e-6))
    cap = f.take("output_logit_soft_cap", 30.0)
    options = dict(qk_factor=float(f.take("qk_dim_factor", 0.5)), head_norm="layer",
                   gate_soft_cap=f.take("gate_soft_cap", 15.0), eps=float(f.take("eps", 1e-6)),
                   norm_eps=eps)
    config = LMConfig(
        vocab_size=f.take("vocab_size", kind=int), d_model=d, num_layers=L, num_heads=H,
        mixer="mlstm", mixer_options={"mlstm": options}, ffn="mlp",
        d_ff=_round_up(d * f.take("ffn_proj_factor", 2.667), f.take(
            "ffn_round_up_to_multiple_of", 64, kind=int)),
        tie_embeddings=bool(f.take("tie_word_embeddings", False)), norm_eps=eps,
        logit_soft_cap=None if cap is None else float(cap), param_dtype=f.param_dtype(),
        chunk_size=f.take("chunk_size", 64, kind=int))
    f.done()
    return config


def to_hf(c: LMConfig) -> dict:
    o = c.options("mlstm")
    return {
        "architectures": [NAME], "model_type": "xlstm", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "embedding_dim": c.d_model, "num_hidden_layers": c.num_layers,
        "num_blocks": c.num_layers, "num_heads": c.num_heads, "use_bias": False,
        "add_out_norm": True, "norm_eps": c.norm_eps, "qk_dim_factor": o.get("qk_factor", 0.5),
        "v_dim_factor": 1.0, "chunk_size": c.chunk_size, "eps": o.get("eps", 1e-6),
        # rounding up to F itself gives back F from F / D * D whatever the float error
        "ffn_proj_factor": c.ff_width / c.d_model, "ffn_round_up_to_multiple_of": c.ff_width,
        "gate_soft_cap": o.get("gate_soft_cap"), "output_logit_soft_cap": c.logit_soft_cap,
        "weight_mode": "single", "tie_word_embeddings": c.tie_embeddings,
        "dtype": c.param_dtype, "autocast_kernel_dtype": c.param_dtype,
        "inference_state_dtype": "float32"}


def tensors(c: LMConfig, hf: dict | None = None) -> dict:
    weight_mode = (hf or {}).get("weight_mode", "single")
    K = int(c.d_model * c.options("mlstm").get("qk_factor", 0.5))
    D, H, F = c.d_model, c.num_heads, c.ff_width
    t = {"backbone.embeddings.weight": (("embed",), "same"),
         "backbone.out_norm.weight": (("norm", "scale"), "same")}
    if not c.tie_embeddings:
        t["lm_head.weight"] = (("head",), "linear")
    for i in range(c.num_layers):
        p, b = f"backbone.blocks.{i}.", ("blocks", i)
        m, a, ffn = b + ("mixer",), p + "mlstm_layer.", b + ("ffn",)
        t[p + "norm_mlstm.weight"] = (b + ("norm1", "scale"), "same")
        t[p + "norm_ffn.weight"] = (b + ("norm2", "scale"), "same")
        t[a + "multihead_norm.weight"] = (m + ("head_norm",), "same")
        t[a + "out_proj.weight"] = (m + ("o_proj", "kernel"), "linear")
        t[p + "ffn.proj_down.weight"] = (ffn + ("w_down", "kernel"), "linear")
        names = [("q_proj", K), ("k_proj", K), ("v_proj", D), ("g_proj", D)]
        if weight_mode == "single":
            for hf_name, (ours, _) in zip(("q", "k", "v", "ogate_preact"), names, strict=True):
                t[a + f"{hf_name}.weight"] = (m + (ours, "kernel"), "linear")
            for g in ("i", "f"):
                t[a + f"{g}gate_preact.weight"] = (m + (f"{g}_proj", "kernel"), "linear")
                t[a + f"{g}gate_preact.bias"] = (m + (f"{g}_proj", "bias"), "same")
            t[p + "ffn.proj_up_gate.weight"] = (ffn + ("w_gate", "kernel"), "linear")
            t[p + "ffn.proj_up.weight"] = (ffn + ("w_up", "kernel"), "linear")
            continue
        rows = fused_rows(1, [n for _, n in names])
        t[a + "qkv_opreact.weight"] = tuple(Piece(m + (n, "kernel"), "linear", r)
                                            for (n, _), r in zip(names, rows, strict=True))
        i_rows, f_rows = fused_rows(1, (H, H))
        for part, layout in (("weight", "linear"), ("bias", "same")):
            t[a + f"ifgate_preact.{part}"] = (
                Piece(m + ("i_proj", part.replace("weight", "kernel")), layout, i_rows),
                Piece(m + ("f_proj", part.replace("weight", "kernel")), layout, f_rows))
        g_rows, u_rows = fused_rows(1, (F, F))
        t[p + "ffn.proj_up_gate_z.weight"] = (Piece(ffn + ("w_gate", "kernel"), "linear", g_rows),
                                              Piece(ffn + ("w_up", "kernel"), "linear", u_rows))
    return t


def matches(c: LMConfig) -> bool:
    o = c.options("mlstm")
    return (set(c.layer_mixers()) == {"mlstm"} and c.ffn == "mlp" and c.norm_offset == 0
            and o.get("head_norm") == "layer" and o.get("norm_eps", 1e-6) == c.norm_eps)


XLSTM = Family(NAME, "xlstm", to_lm, to_hf, tensors, matches)
