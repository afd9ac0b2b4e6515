"""Sequence (context) parallel versions of the ops, over a mesh axis (default "seq").

Each function works on the local shard inside a user's `shard_map` (`axis_name=`), or, given
`mesh=`, builds the `shard_map` itself. See docs/sequence_parallel.md.
"""

from linear_jax.parallel import attention, conv
from linear_jax.parallel._compat import make_mesh
from linear_jax.parallel.decay import gla, linear_attention, simple_gla
from linear_jax.parallel.delta import delta_rule, gated_delta_rule
from linear_jax.parallel.ssd import ssd

__all__ = ["attention", "conv", "delta_rule", "gated_delta_rule", "gla", "linear_attention",
           "make_mesh", "simple_gla", "ssd"]
