"""Pallas kernels, installed as `linear_jax.kernels`.

Users never import these: the ops reach them through `impl=` by way of the `Kernel(...)` entries
of each op's record (`linear_jax.ops.registry`), with their tunables in `configs.py`. `gpu/` holds
kernels lowered through Triton (any NVIDIA GPU) and, in `gpu/hopper/`, Mosaic GPU kernels (Hopper:
TMA, wgmma); `tpu/` holds Mosaic TPU kernels; `tiles.py` the per-chunk tile math they share. On a
CPU backend the Triton and TPU kernels run in Pallas interpret mode, which is how CI executes them;
the Mosaic GPU ones are exported for CUDA there and run in jax's GPU interpreter.
"""
