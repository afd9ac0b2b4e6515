"""What a checkpoint family declares, and the strict reader of its `config.json`.

A `Family` maps a transformers architecture onto `LMConfig` and back, and names every tensor:
`tensors(config, hf)` (hf: the config.json read, None when saving) is {checkpoint name: (path in
the model's parameter state, layout)} or {checkpoint name: (Piece, ...)} where one stored tensor
fills several parameters (rows of a fused projection), one slot of a stacked parameter (an
expert) or part of a fused one (the channels of one input of a short conv over [q | k | v]).
The layout says how the stored array relates to ours:

    "same"    stored as we hold it
    "linear"  torch Linear weight [out, in]; ours is nnx.Linear's kernel [in, out] (its transpose)
    "conv"    torch depthwise Conv1d weight [C, 1, W]; ours is ShortConv's [W, C]
    "heads_4d" a per-head vector stored as [1, 1, n, 1] (Kimi's A_log); ours is [n]

`Fields` reads a config the way a loader must: every field is either used, checked against the
one value we implement, or listed as harmless (initialisation, generation and bookkeeping
fields); anything else is a ValueError naming the field, so a checkpoint never loads into a
model that computes something else.

`decoder` builds the table of a Llama-style checkpoint (embedding, final norm, head, the two norms
of each block) around what a family names per layer; `linears`, `experts` and the `SWIGLU` and
`MIXTRAL_EXPERT` names fill it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from linear_jax.models import LMConfig

# Written by every transformers config, none of which changes the function the weights compute.
GENERIC = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "initializer_range", "output_attentions", "output_hidden_states", "return_dict",
    "_name_or_path", "name_or_path", "is_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "_attn_implementation", "_attn_implementation_autoset",
    "_commit_hash", "use_return_dict", "tie_encoder_decoder", "add_cross_attention",
})
FLOATS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
LAYOUTS = ("same", "linear", "conv", "heads_4d")


@dataclasses.dataclass(frozen=True, eq=False)
class Piece:
    """Where (part of) a stored tensor goes: parameter `path`, after `layout`; `rows` (an index
    array) takes those rows of a fused [out, in] weight, `index` fills slot `index` of the
    parameter's first axis (stacked experts), `cols` (an index array) fills those entries of
    the parameter's last axis."""
    path: tuple
    layout: str = "same"
    rows: np.ndarray | None = None
    index: int | None = None
    cols: np.ndarray | None = None


def pieces(entry) -> tuple[Piece, ...]:
    """A table entry as pieces: `(path, layout)` is one whole piece."""
    if isinstance(entry, Piece):
        return (entry,)
    if len(entry) == 2 and isinstance(entry[1], str):
        return (Piece(tuple(entry[0]), entry[1]),)
    return tuple(entry)


def fused_rows(groups: int, sizes) -> list[np.ndarray]:
    """Rows of each part of a weight fused per group: [group][part 0 | part 1 | ...] (the
    `in_proj_qkvz` of Qwen3-Next: per key head q, k, v, z), one index array per part."""
    offsets = np.cumsum([0, *sizes])
    block = offsets[-1]
    return [np.concatenate([g * block + np.arange(offsets[i], offsets[i + 1])
                            for g in range(groups)]) for i in range(len(sizes))]


# the gated MLP's projections, (checkpoint name, ours): Llama's, and a Mixtral expert's
SWIGLU = (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
MIXTRAL_EXPERT = (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_down"))


def linears(prefix: str, path: tuple, names) -> dict:
    """torch Linear weights `{prefix}{theirs}.weight` as the kernels of our `path + (ours,)`, for
    each (theirs, ours) of `names`."""
    return {f"{prefix}{theirs}.weight": (path + (ours, "kernel"), "linear")
            for theirs, ours in names}


def experts(prefix: str, path: tuple, count: int, names) -> dict:
    """Expert e's weights `{prefix}experts.{e}.{theirs}.weight` as slot e of our stacked
    `path + (ours,)`, for each (theirs, ours) of `names`."""
    return {f"{prefix}experts.{e}.{theirs}.weight": (Piece(path + (ours,), "linear", index=e),)
            for e in range(count) for theirs, ours in names}


def decoder(c: LMConfig, layer: Callable[[int, str, str, tuple], dict],
            prefix: str = "model.") -> dict:
    """The table of a Llama-style checkpoint: `{prefix}embed_tokens`, the final `{prefix}norm`,
    `lm_head` unless the embeddings are tied, and per layer i, under `{prefix}layers.{i}.`, its
    `input_layernorm` and `post_attention_layernorm` (the block's norm1 and norm2) and what
    `layer(i, mixer, p, b)` names (p: that prefix, b: the block's path `("blocks", i)`)."""
    t = {prefix + "embed_tokens.weight": (("embed",), "same"),
         prefix + "norm.weight": (("norm", "scale"), "same")}
    if not c.tie_embeddings:
        t["lm_head.weight"] = (("head",), "linear")
    for i, mixer in enumerate(c.layer_mixers()):
        p, b = f"{prefix}layers.{i}.", ("blocks", i)
        t[p + "input_layernorm.weight"] = (b + ("norm1", "scale"), "same")
        t[p + "post_attention_layernorm.weight"] = (b + ("norm2", "scale"), "same")
        t.update(layer(i, mixer, p, b))
    return t


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str                                  # e.g. "MambaForCausalLM"
    model_type: str                                    # e.g. "mamba"
    to_lm: Callable[[dict], LMConfig]                  # raises ValueError naming a field
    to_hf: Callable[[LMConfig], dict]                  # the fields of config.json
    tensors: Callable[..., dict]                       # (config, config.json or None) -> table
    matches: Callable[[LMConfig], bool]                # whether `to_hf` can describe a config
    # buffers some checkpoints store though the config implies them (MiniMax's decay tables):
    # config -> {name: array}; checked against the stored ones on load, written on save
    derived: Callable[[LMConfig], dict] | None = None
    # prefixes of tensors left on disk: parts of the checkpoint that are not the causal LM (a
    # vision tower, a multi-token-prediction head), which transformers' LM skips as well
    ignored: tuple[str, ...] = ()
    # the architecture `save` writes a model loaded from this one as (a multimodal checkpoint's
    # language model is saved as its text-only LM); None: this one
    saves_as: str | None = None


class Fields:
    """One config.json, read field by field; `done()` raises for any field nobody read."""

    def __init__(self, hf: dict, family: str, harmless=()):
        self.hf, self.family, self.seen = dict(hf), family, set(GENERIC) | set(harmless)

    def take(self, name: str, default=None, kind=None):
        self.seen.add(name)
        value = self.hf.get(name, default)
        if value is None:
            raise ValueError(f"{self.family}: config field {name!r} is missing")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{self.family}: config field {name!r} must be a positive int, "
                             f"got {value!r}")
        return value

    def optional(self, name: str):
        """The field's value, None when absent or null."""
        self.seen.add(name)
        return self.hf.get(name)

    def expect(self, name: str, supported, default=None):
        """The field must hold `supported` (what our layers compute) when present."""
        value = self.take(name, supported if default is None else default)
        if value != supported and not _same(value, supported):
            raise ValueError(f"{self.family}: config field {name}={value!r} is not supported "
                             f"(only {supported!r})")
        return value

    def param_dtype(self) -> str:
        dtype = self.hf.get("dtype", self.hf.get("torch_dtype")) or "float32"
        if dtype not in FLOATS:
            raise ValueError(f"{self.family}: config field dtype={dtype!r} is not supported "
                             f"(one of {sorted(FLOATS)})")
        return dtype

    def done(self) -> None:
        unknown = sorted(set(self.hf) - self.seen)
        if unknown:
            raise ValueError(f"{self.family}: config field(s) {unknown} are not supported "
                             f"(unknown to this loader, so what they change cannot be checked)")


def json_float(value):
    """transformers writes non-finite floats as {"__float__": "Infinity"} (JSON has none)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, (list, tuple)):
        return [json_float(v) for v in value]
    return value


def _same(a, b) -> bool:
    """Equality of JSON values up to list/tuple (a tuple default reads back as a list)."""
    try:
        return np.array_equal(np.asarray(json_float(a), float), np.asarray(json_float(b), float))
    except (TypeError, ValueError):
        return False


def to_ours(array, layout: str):
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array[:, 0, :].T
    if layout == "heads_4d":
        return array.reshape(-1)
    return array


def to_theirs(array, layout: str):
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.T[:, None, :]
    if layout == "heads_4d":
        return array.reshape(1, 1, -1, 1)
    return array


def stored_shape(shape: tuple, layout: str) -> tuple:
    """The shape a checkpoint stores for a parameter of our `shape`."""
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "conv":
        return (shape[1], 1, shape[0])
    if layout == "heads_4d":
        return (1, 1, shape[0], 1)
    return tuple(shape)
