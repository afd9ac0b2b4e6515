"""Pallas GPU kernels (Triton lowering for any NVIDIA GPU; Mosaic GPU for Hopper)."""
