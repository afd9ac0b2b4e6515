"""linear_jax: linear attention, gated linear attention, the delta rule family and selective
state-space scans in JAX, each as a `lax.scan` reference, a chunk-parallel XLA form and, where it
is hot, a Pallas kernel; Flax NNX mixers and language models on top.

Submodules: `ops` (pure functions), `layers` (NNX token mixers), `models` (LM, generate),
`parallel` (sequence parallelism over a mesh axis), `training` (sharded training harness).
"""

from linear_jax import _compat

_compat.cpu_workarounds()

from linear_jax import ops  # noqa: E402

__version__ = "0.1.0.dev0"
__all__ = ["ops"]
