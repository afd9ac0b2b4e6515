"""Sequence (context) parallel versions of the ops, over a mesh axis (default "seq").

Every name here is a function (or, `SeqParallel`, a class): the linear recurrences
(`linear_attention`, `simple_gla`, `gla`, `delta_rule`, `gated_delta_rule`, `ssd`, `kda`, `rwkv7`,
`mamba3`, `mamba3_mimo`, `log_linear_simple_gla`, `log_linear_gated_delta_rule`, `diagonal_scan`,
`hgrn`), causal softmax `attention` (K, V all-gathered; `layout="zigzag"` balances the causal work
and permutes for you), `latent_attention` (MLA: the latents all-gathered) and the halo
`short_conv`. Each works on the local shards inside a user's `shard_map` (`axis_name=`) or, given
`mesh=`, builds the `shard_map` itself; `make_mesh` builds a mesh (Auto axis types).
`SeqParallel(mesh)`, passed as `seq_parallel=` to a model or layer call, runs a whole model split
along T (`linear_jax.parallel.dispatch`). The modules behind them: `decay`, `delta`, `ssd`,
`rank_one`, `mamba3`, `log_linear`, `diagonal`, `softmax`, `latent`, `halo`, `affine`, `zeco`,
`mesh`, `dispatch`.
See docs/sequence_parallel.md.
"""

from linear_jax._compat import make_mesh
from linear_jax.parallel.decay import gla, linear_attention, simple_gla
from linear_jax.parallel.delta import delta_rule, gated_delta_rule
from linear_jax.parallel.diagonal import diagonal_scan, hgrn
from linear_jax.parallel.dispatch import SeqParallel
from linear_jax.parallel.halo import short_conv
from linear_jax.parallel.latent import latent_attention
from linear_jax.parallel.log_linear import log_linear_gated_delta_rule, log_linear_simple_gla
from linear_jax.parallel.mamba3 import mamba3, mamba3_mimo
from linear_jax.parallel.rank_one import kda, rwkv7
from linear_jax.parallel.softmax import attention, from_zigzag, to_zigzag
from linear_jax.parallel.ssd import ssd

__all__ = ["SeqParallel", "attention", "delta_rule", "diagonal_scan", "from_zigzag",
           "gated_delta_rule", "gla", "hgrn", "kda", "latent_attention", "linear_attention",
           "log_linear_gated_delta_rule", "log_linear_simple_gla", "make_mesh", "mamba3",
           "mamba3_mimo", "rwkv7", "short_conv", "simple_gla", "ssd", "to_zigzag"]
