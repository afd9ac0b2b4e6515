"""`LMConfig`: everything that shapes a language model, as one frozen, validated dataclass.

The mixer of each layer comes from `layers` (an explicit list, e.g. the hybrids of LASP-2H and
Linear-MoE) or from `mixer` with softmax attention every `attn_every`-th layer (layers
attn_every - 1, 2 attn_every - 1, ...; 0 means none). `mixer_options` maps a mixer name to extra
constructor arguments (e.g. `{"attention": {"window": 512}, "gla": {"expand_k": 1.0}}`).
The feed-forward is a SwiGLU MLP (`ffn="mlp"`), a top-k mixture of experts (`ffn="moe"`, on
every `moe_every`-th layer, the others keeping the MLP; `moe_shared > 0` adds Qwen-MoE's shared
expert of that width, gated per token by a sigmoid), or none (`ffn="none"`: blocks of one
norm and one mixer, as Mamba and Mamba-2 stack them). The MLP's gate activation is
`ffn_activation` ("silu": SwiGLU; "gelu_tanh": GeGLU, Gemma's) and `ffn_bias` gives its three
projections biases (both for `ffn="mlp"` only). `embed_scale` multiplies the embeddings on the
way in (Gemma: sqrt(d_model)). `max_positions` > 0 adds a learned embedding of each token's
position in its document, for up to that many positions (GPT-2's; Zoology's attention baseline
has them in place of RoPE, `mixer_options={"attention": {"rope_theta": None}}`). `ffn_layers`
lists "mlp" or "moe" per layer instead of `moe_every` (DeepSeek's and Kimi Linear's first dense
layers); experts are `moe_d_ff`
wide when given (else `d_ff`, as the MLPs); `moe_options` are the MoE's own arguments (its router:
`scoring`, `score_bias`, `groups`, `topk_groups`, `renormalize`, `scale`; `shared_gate`).

Blocks are pre-norm, h + f(norm(h)) (`residual="pre"`), or MiniMax-01's `residual="normed"`,
h' = alpha norm(h) + beta f(norm(h)): the residual stream carries the normalised input, scaled;
`residual_scales` maps a mixer name or "ffn" to its (alpha, beta), (1, 1) when absent.
`norm="none"` drops the block and final norms (h + f(h), logits = h W_head): the stacks of
linear self-attention that in-context-regression papers analyse have none (pre-norm only).

`hub_format` names the transformers architecture `linear_jax.hub.save` writes (`hub.load` sets
the one it read); it changes nothing the model computes.

`impl` and `kernel_config` reach every linear mixer's op as `impl=` and `config=` (`impl` is an
op implementation: "auto", "recurrent", "chunk", "pallas", "pallas:<backend>"); softmax attention
keeps its own `impl` (its backend: "auto", "xla", "cudnn"), set through its options,
`mixer_options={"attention": {"impl": "xla"}}`. A mixer's options win over the model-wide
arguments. `kernel_config` is a tuple of kernel configs (`linear_jax.kernels.configs`, e.g.
`(TritonChunkConfig(block_v=32), TpuConfig(chunk=128))`), from which each kernel takes the one of
its type; kernels without one in it run with their device defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from linear_jax.layers import MIXERS
from linear_jax.layers.ffn import ACTIVATIONS

FFNS = ("mlp", "moe", "none")
REMATS = ("none", "block")


def _freeze(options) -> tuple:
    return tuple(sorted((name, tuple(sorted(dict(kw).items()))) for name, kw in
                        dict(options).items()))


def _kernel_configs(configs) -> tuple:
    """`kernel_config` as a tuple of frozen dataclasses with a `default` constructor (what
    `linear_jax.kernels.configs` holds), at most one per type. A lone config is a tuple of one."""
    if dataclasses.is_dataclass(configs) and not isinstance(configs, type):
        configs = (configs,)
    if not isinstance(configs, (tuple, list)):
        raise ValueError(f"LMConfig: kernel_config must be a tuple of kernel configs, got "
                         f"{type(configs).__name__} {configs!r}")
    configs = tuple(configs)
    for c in configs:
        if (not dataclasses.is_dataclass(c) or isinstance(c, type)
                or not type(c).__dataclass_params__.frozen or not callable(
                    getattr(type(c), "default", None))):
            raise ValueError(f"LMConfig: kernel_config must hold kernel configs (frozen "
                             f"dataclasses of linear_jax.kernels.configs), got "
                             f"{type(c).__name__} {c!r}")
    names = [type(c).__name__ for c in configs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"LMConfig: kernel_config holds more than one {', '.join(twice)}; "
                         f"give at most one config per kernel type")
    return configs


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mixer: str = "gla"
    attn_every: int = 0
    layers: tuple[str, ...] | None = None
    mixer_options: Mapping[str, Mapping] | tuple = ()
    ffn: str = "mlp"
    d_ff: int | None = None                  # default: 8/3 d_model rounded up to a multiple of 8
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1
    moe_shared: int = 0                      # width of an always-on shared expert (0: none)
    ffn_activation: str = "silu"             # the MLP's gate: "silu" (SwiGLU), "gelu_tanh" (GeGLU)
    ffn_bias: bool = False                   # biases on the MLP's projections
    embed_scale: float | None = None         # h = scale * embed(tokens) (Gemma: sqrt(d_model))
    max_positions: int = 0                   # learned absolute positions for so many tokens
    ffn_layers: tuple[str, ...] | None = None    # per layer "mlp" | "moe" (overrides moe_every)
    moe_d_ff: int | None = None              # expert width; None: d_ff's
    moe_options: Mapping[str, Any] | tuple = ()
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-6
    norm_offset: float = 0.0                 # block and final norms scale by offset + weight
    logit_soft_cap: float | None = None      # logits -> c tanh(logits / c) (xLSTM 7B: 30)
    residual: str = "pre"                    # "pre" | "normed" (MiniMax-01's block, see below)
    residual_scales: Mapping[str, tuple[float, float]] | tuple = ()   # name -> (alpha, beta)
    norm: str = "rms"                        # "rms" | "none" (no block or final norms)
    chunk_size: int = 64
    impl: str = "auto"
    # "block": the backward recomputes each block from its input, so training keeps one
    # [B, T, d_model] activation per layer instead of every layer's intermediates (about a third
    # more compute); "none": autodiff keeps what it needs
    remat: str = "none"
    kernel_config: tuple[Any, ...] = ()      # kernel configs, each kernel takes the one of its type
    dtype: str | None = None                 # computation dtype, e.g. "bfloat16"; None: params'
    param_dtype: str = "float32"
    # the transformers architecture `hub.save` writes (`hub.load` sets the one it read): two
    # checkpoint formats can describe the same model (Qwen3-Next's and Qwen3.5's)
    hub_format: str | None = None

    def __post_init__(self):
        # stored hashable (the config is static data of the model's graph)
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("mixer_options", _freeze(self.mixer_options))
        set_("kernel_config", _kernel_configs(self.kernel_config))
        set_("moe_options", tuple(sorted(dict(self.moe_options).items())))
        set_("residual_scales", tuple(sorted((k, tuple(float(x) for x in v))
                                             for k, v in dict(self.residual_scales).items())))
        if self.residual not in ("pre", "normed") or (self.residual == "normed"
                                                        and self.ffn == "none"):
            raise ValueError(f"LMConfig: residual must be 'pre' or 'normed' (the latter with an "
                             f"ffn), got {self.residual!r} with ffn={self.ffn!r}")
        if self.norm not in ("rms", "none") or (self.norm == "none"
                                                 and self.residual != "pre"):
            raise ValueError(f"LMConfig: norm must be 'rms' or 'none' (the latter with "
                             f"residual='pre'), got {self.norm!r} with "
                             f"residual={self.residual!r}")
        if not isinstance(self.max_positions, int) or self.max_positions < 0:
            raise ValueError(f"LMConfig: max_positions must be an int >= 0 (0: no learned "
                             f"positions), got {self.max_positions!r}")
        if self.remat not in REMATS:
            raise ValueError(f"LMConfig: remat must be one of {REMATS}, got {self.remat!r}")
        if self.layers is not None:
            set_("layers", tuple(self.layers))
        for name, what in ((self.vocab_size, "vocab_size"), (self.d_model, "d_model"),
                           (self.num_layers, "num_layers"), (self.num_heads, "num_heads")):
            if not isinstance(name, int) or name < 1:
                raise ValueError(f"LMConfig: {what} must be a positive int, got {name!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"LMConfig: num_heads={self.num_heads} must divide "
                             f"d_model={self.d_model}")
        if self.layers is not None and len(self.layers) != self.num_layers:
            raise ValueError(f"LMConfig: layers lists {len(self.layers)} mixers but "
                             f"num_layers={self.num_layers}")
        if self.attn_every < 0:
            raise ValueError(f"LMConfig: attn_every must be >= 0, got {self.attn_every}")
        unknown = sorted({m for m in self.layer_mixers() if m not in MIXERS} |
                         {m for m, _ in self.mixer_options if m not in MIXERS})
        if unknown:
            raise ValueError(f"LMConfig: unknown mixer(s) {unknown}; known: {sorted(MIXERS)}")
        if self.ffn not in FFNS:
            raise ValueError(f"LMConfig: ffn must be one of {FFNS}, got {self.ffn!r}")
        if self.ffn == "moe" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"LMConfig: top_k={self.top_k} must be in [1, num_experts="
                             f"{self.num_experts}]")
        if self.moe_shared < 0:
            raise ValueError(f"LMConfig: moe_shared must be >= 0, got {self.moe_shared}")
        if self.ffn_activation not in ACTIVATIONS:
            raise ValueError(f"LMConfig: ffn_activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.ffn_activation!r}")
        if (self.ffn_activation != "silu" or self.ffn_bias) and self.ffn != "mlp":
            raise ValueError(f"LMConfig: ffn_activation={self.ffn_activation!r} and "
                             f"ffn_bias={self.ffn_bias} shape the MLP; ffn={self.ffn!r} has "
                             f"only the SwiGLU experts")
        if self.moe_every < 1:
            raise ValueError(f"LMConfig: moe_every must be >= 1, got {self.moe_every}")
        if self.ffn_layers is not None:
            set_("ffn_layers", tuple(self.ffn_layers))
            if (self.ffn != "moe" or len(self.ffn_layers) != self.num_layers
                    or set(self.ffn_layers) - {"mlp", "moe"}):
                raise ValueError(f"LMConfig: ffn_layers must list 'mlp' or 'moe' for each of "
                                 f"the {self.num_layers} layers, with ffn='moe'; got "
                                 f"{self.ffn_layers!r} with ffn={self.ffn!r}")

    def layer_mixers(self) -> tuple[str, ...]:
        if self.layers is not None:
            return self.layers
        k = self.attn_every
        return tuple("attention" if k and (i + 1) % k == 0 else self.mixer
                     for i in range(self.num_layers))

    def options(self, mixer: str) -> dict:
        return dict(dict(self.mixer_options).get(mixer, ()))

    def scales(self, name: str) -> tuple[float, float]:
        return dict(self.residual_scales).get(name, (1.0, 1.0))

    def layer_ffn(self, i: int) -> str:
        if self.ffn == "none":
            return "none"
        if self.ffn_layers is not None:
            return self.ffn_layers[i]
        return "moe" if self.ffn == "moe" and (i + 1) % self.moe_every == 0 else "mlp"

    @property
    def ff_width(self) -> int:
        return self.d_ff or -(-(8 * self.d_model // 3) // 8) * 8

    @property
    def moe_width(self) -> int:
        return self.moe_d_ff or self.ff_width
