"""Tunables of the TPU kernels, validated once."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Block sizes and compile options shared by the TPU kernels.

    chunk: time block per grid step (the chunk of the chunk-parallel form). None takes the op's
      `chunk_size`, rounded up to the dtype's sublane packing (8 rows for 32-bit, 16 for 16-bit).
      The result does not depend on it beyond rounding; 64 or 128 keep the [C, C] intra matrices
      one MXU tile.
    lane: K and V are zero-padded to a multiple of this (the vreg lane width and MXU edge).
    sub_chunk: GLA's sub-chunk (the vector gate's intra-chunk factoring, see `gla.py`); a power of
      2, used as gcd(chunk, sub_chunk).
    vmem_limit_bytes: scoped VMEM limit handed to Mosaic (None: the compiler default).
    interpret: None: compiled on TPU, TPU interpret mode elsewhere; True / False force it.
    """

    chunk: int | None = None
    lane: int = 128
    sub_chunk: int = 16
    vmem_limit_bytes: int | None = None
    interpret: bool | None = None

    def __post_init__(self):
        if self.chunk is not None and (self.chunk < 8 or self.chunk % 8):
            raise ValueError(f"TpuConfig.chunk must be a positive multiple of 8, got {self.chunk}")
        if self.lane < 128 or self.lane % 128:
            raise ValueError(f"TpuConfig.lane must be a multiple of 128, got {self.lane}")
        if self.sub_chunk < 8 or self.sub_chunk & (self.sub_chunk - 1):
            raise ValueError(f"TpuConfig.sub_chunk must be a power of 2 >= 8, got {self.sub_chunk}")
        if self.vmem_limit_bytes is not None and self.vmem_limit_bytes <= 0:
            raise ValueError("TpuConfig.vmem_limit_bytes must be positive, got "
                             f"{self.vmem_limit_bytes}")

    def chunk_for(self, chunk_size: int, itemsize: int) -> int:
        pack = 8 * max(1, 4 // itemsize)
        C = self.chunk or int(chunk_size)
        return -(-C // pack) * pack


DEFAULT = TpuConfig()
