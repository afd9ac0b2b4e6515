"""Pallas kernels, installed as `linear_jax.kernels`.

Users never import these: the ops reach them through `impl="pallas"` (or `"auto"` on an
accelerator) by way of `registry.kernels_for`. `gpu/` holds kernels lowered through Triton (any
NVIDIA GPU) and Mosaic GPU (Hopper); `tpu/` holds Mosaic TPU kernels. On a CPU backend every
kernel runs in Pallas interpret mode, which is how CI executes them.
"""
