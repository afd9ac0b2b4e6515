"""Linear recurrences as plain functions.

Every op takes `[B, T, H, D]` inputs and the keyword arguments `scale`, `initial_state`,
`segment_ids`, `chunk_size`, `impl`, and returns `(output, final_state)` with the state in float32.
"""

from linear_jax.ops.gla import gla
from linear_jax.ops.linear_attention import linear_attention
from linear_jax.ops.simple_gla import simple_gla

__all__ = ["gla", "linear_attention", "simple_gla"]
