"""Sequence (context) parallel versions of the ops, over a mesh axis (default "seq").

Each function works on the local shard inside a user's `shard_map` (`axis_name=`), or, given
`mesh=`, builds the `shard_map` itself. `SeqParallel(mesh)`, passed as `seq_parallel=` to a model
or layer call, runs a whole model split along T (`linear_jax.parallel.dispatch`). See
docs/sequence_parallel.md.
"""

from linear_jax._compat import make_mesh
from linear_jax.parallel import attention, conv, dispatch
from linear_jax.parallel.decay import gla, linear_attention, simple_gla
from linear_jax.parallel.delta import delta_rule, gated_delta_rule
from linear_jax.parallel.dispatch import SeqParallel
from linear_jax.parallel.mamba3 import mamba3
from linear_jax.parallel.rank_one import kda, rwkv7
from linear_jax.parallel.ssd import ssd

__all__ = ["SeqParallel", "attention", "conv", "delta_rule", "dispatch", "gated_delta_rule", "gla",
           "linear_attention", "make_mesh", "simple_gla", "ssd", "kda", "rwkv7", "mamba3"]
