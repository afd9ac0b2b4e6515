"""Flax NNX token mixers, one per file, each a thin module over the ops in `linear_jax.ops`.

Every mixer follows one contract: `Mixer(d_model, num_heads, *, rngs, dtype, param_dtype, ...)`,
`__call__(x [B, T, D], *, segment_ids=None, cache=None, seq_parallel=None) -> (y [B, T, D],
new_cache)` and `init_cache(batch_size, dtype, *, max_len=None)`. `make_mixer` builds one by name.
`seq_parallel` (a `linear_jax.parallel.SeqParallel`) runs the call split along T over a mesh
axis; `supports_seq_parallel(name)` says which mixers can (the others raise). A mixer over a linear
op takes `chunk_size`, `impl` and `kernel_config` (a kernel config or a tuple of them) and hands
them to its op as `chunk_size=`, `impl=`, `config=`; `OP_IMPL = False` marks a mixer whose
`impl` is not an op implementation (softmax attention's backend), which a model leaves alone.
"""

from __future__ import annotations

import inspect

from linear_jax.layers.attention import Attention
from linear_jax.layers.based import Based
from linear_jax.layers.delta_product import DeltaProduct
from linear_jax.layers.deltanet import EFLA, DeltaNet
from linear_jax.layers.gated_attention import GatedAttention
from linear_jax.layers.gated_deltanet import GatedDeltaNet
from linear_jax.layers.gla import GLA
from linear_jax.layers.gsa import GSA
from linear_jax.layers.hedgehog import Hedgehog
from linear_jax.layers.hgrn import HGRN
from linear_jax.layers.hgrn2 import HGRN2
from linear_jax.layers.hla import HLA
from linear_jax.layers.kda import KDA
from linear_jax.layers.linear_attention import LinearAttention
from linear_jax.layers.log_linear import LogLinearGatedDeltaNet, LogLinearMamba2
from linear_jax.layers.lte_attention import LTEAttention
from linear_jax.layers.mamba import Mamba
from linear_jax.layers.mamba2 import Mamba2
from linear_jax.layers.mamba3 import Mamba3
from linear_jax.layers.minimax import MiniMaxLightning
from linear_jax.layers.mla import MLA
from linear_jax.layers.mlstm import MLSTM
from linear_jax.layers.mom import MoM
from linear_jax.layers.rebased import ReBased
from linear_jax.layers.retnet import Lightning, RetNet
from linear_jax.layers.rglru import RGLRU
from linear_jax.layers.rwkv7 import RWKV7
from linear_jax.layers.s4d import S4D

MIXERS = {
    "attention": Attention,
    "gated_attention": GatedAttention,
    "linear_attention": LinearAttention,
    "retnet": RetNet,
    "lightning": Lightning,
    "minimax_lightning": MiniMaxLightning,
    "gla": GLA,
    "hgrn2": HGRN2,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "delta_product": DeltaProduct,
    "efla": EFLA,
    "hgrn": HGRN,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "based": Based,
    "rebased": ReBased,
    "hedgehog": Hedgehog,
    "gsa": GSA,
    "mom": MoM,
    "mlstm": MLSTM,
    "hla": HLA,
    "log_linear_mamba2": LogLinearMamba2,
    "log_linear_gated_deltanet": LogLinearGatedDeltaNet,
    "lte_attention": LTEAttention,
    "kda": KDA,
    "rwkv7": RWKV7,
    "mamba3": Mamba3,
    "rglru": RGLRU,
    "mla": MLA,
    "s4d": S4D,
}


# Arguments the model passes to every mixer; a mixer that has no use for one does not take it.
_COMMON = ("num_heads", "chunk_size", "impl", "kernel_config", "layer_idx", "num_layers", "std",
           "first_of_kind")


def _accepts(cls, name: str) -> bool:
    return any(name in inspect.signature(c.__init__).parameters
               for c in cls.__mro__ if "__init__" in c.__dict__)


def make_mixer(name: str, d_model: int, num_heads: int, *, rngs, options=None, **kw):
    """Builds mixer `name`. Of the common arguments (`_COMMON`) a mixer gets those it takes
    (`chunk_size` means nothing to attention, `num_heads` to Mamba); any other keyword is the
    mixer's own option and reaches it unfiltered, so a misspelt option raises. `options` (a dict
    of the mixer's own options, e.g. `LMConfig.mixer_options[name]`) is merged last and wins over
    the keywords, a common one included (`options={"impl": "xla"}` for attention).

    `impl` among the common arguments is an op implementation (`linear_jax.ops.registry`); a
    mixer whose `impl` means something else (`Attention`: its softmax backend) declares
    `OP_IMPL = False`, and a model then passes it `impl` only through its options."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {sorted(MIXERS)}")
    cls = MIXERS[name]
    kw = {k: v for k, v in dict(kw, num_heads=num_heads).items()
          if k not in _COMMON or _accepts(cls, k)}
    return cls(d_model, rngs=rngs, **{**kw, **dict(options or {})})


def supports_seq_parallel(name: str) -> bool:
    """Whether mixer `name` runs sequence-parallel (`seq_parallel=` in its call)."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {sorted(MIXERS)}")
    return MIXERS[name].SEQ_PARALLEL


__all__ = ["MIXERS", "make_mixer", "supports_seq_parallel",
           *(c.__name__ for c in MIXERS.values())]
