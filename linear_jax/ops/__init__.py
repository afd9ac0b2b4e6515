"""Linear recurrences as plain functions.

Every op takes `[B, T, ...]` inputs and the keyword arguments `initial_state`, `segment_ids`,
`chunk_size`, `impl`, `config` (and `scale` where there is a query), and returns
`(output, final_state)` with the state in float32. Each op module registers the op's record of
implementations in `registry`, which resolves `impl` and `config` (docs/architecture.md).
"""

from linear_jax.ops import feature_maps, norms
from linear_jax.ops.delta_product import delta_product
from linear_jax.ops.delta_rule import delta_rule, efla_beta, gated_delta_rule
from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.gla import gla
from linear_jax.ops.hgrn import hgrn
from linear_jax.ops.kda import kda
from linear_jax.ops.linear_attention import linear_attention
from linear_jax.ops.lion import lion
from linear_jax.ops.log_linear_gated_delta_rule import log_linear_gated_delta_rule
from linear_jax.ops.log_linear_simple_gla import log_linear_simple_gla
from linear_jax.ops.mamba3 import mamba3
from linear_jax.ops.mamba3_mimo import mamba3_mimo
from linear_jax.ops.mlstm import mlstm
from linear_jax.ops.rwkv7 import rwkv7
from linear_jax.ops.s4d import causal_conv, s4d_discretize, s4d_kernel
from linear_jax.ops.selective_scan import selective_scan
from linear_jax.ops.short_conv import short_conv
from linear_jax.ops.simple_gla import simple_gla
from linear_jax.ops.ssd import ssd

__all__ = [
    "causal_conv",
    "diagonal_scan",
    "hgrn",
    "s4d_discretize",
    "s4d_kernel",
    "selective_scan",
    "short_conv",
    "delta_product",
    "delta_rule",
    "efla_beta",
    "feature_maps",
    "gated_delta_rule",
    "gla",
    "linear_attention",
    "mlstm",
    "norms",
    "simple_gla",
    "ssd",
    "log_linear_simple_gla",
    "log_linear_gated_delta_rule",
    "lion",
    "kda",
    "rwkv7",
    "mamba3",
    "mamba3_mimo",
]
