"""Mosaic GPU kernels for Hopper (sm_90): TMA pipelines, wgmma, warp-specialised warpgroups.

`decay.simple_gla`: simple GLA, linear attention (g = None) and Mamba-2's SSD, forward and backward
(walks in `decay`, the gradient kernel in `decay_grad`; NOTES.md: the changes since run 1).
`gla.gla`: GLA (the vector gate), forward and backward: the scalar design with the gate moved onto
q and k by a chunk-parallel kernel (exact dyadic span levels), the same chunk walk, a chunk-parallel
gradient kernel. Both configured by `linear_jax.kernels.configs.HopperChunkConfig`. See each
module's docstring for its stages, tiles, warpgroup roles and roofline.
"""
