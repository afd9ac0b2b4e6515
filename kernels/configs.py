"""Every kernel's tunables, as frozen dataclasses, and their per-device defaults: the one place.

A config is an argument: `op(..., impl="pallas", config=TritonChunkConfig(chunk=128))`, or a tuple
of configs held by a model (`LMConfig.kernel_config`) from which each kernel takes the one of its
type. `Class.default(device)` is what a kernel runs with when given none; it reads the device's
multiprocessor count where a tunable depends on it (grids are sized to keep every SM busy).

Every config has `interpret`: None runs compiled on the kernel's own platform and in Pallas
interpret mode on a CPU; True forces interpret mode; False forces the compiled lowering, which is
how tests export a kernel for its platform from a CPU host (`jax.export(..., platforms=[...])`).

This module imports nothing from Pallas, so models and configs can hold kernel configs cheaply.
"""

from __future__ import annotations

import dataclasses
import typing

# Multiprocessors of the GPU the tunables were measured on (H100 / H200): grids are sized in
# multiples of this when a device does not report its own count.
_DEFAULT_SMS = 132


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def next_pow2(x: int, lo: int = 16) -> int:
    p = lo
    while p < x:
        p *= 2
    return p


def multiprocessors(device) -> int:
    """The device's SM count (`core_count` on CUDA devices), else that of an H100 / H200."""
    n = getattr(device, "core_count", None) if device is not None else None
    return int(n) if n else _DEFAULT_SMS


def _check_interpret(cls, value):
    if value not in (None, True, False):
        raise ValueError(f"{cls}.interpret must be None, True or False, got {value!r}")


class _OwnChunk:
    """A config whose kernels keep their own chunk: the op's chunk_size does not change it, and
    its defaults do not depend on the device."""

    @classmethod
    def default(cls, device=None):
        return cls()

    def for_chunk(self, chunk_size: int):
        return self


def _check_hopper(config, **choices):
    """The fields every Mosaic GPU (Hopper) config has, semantics and interpret, and those named
    in `choices` (field: its allowed values; (False, True): a switch, which takes a bool only)."""
    name = type(config).__name__
    for f, ok in choices.items():
        v = getattr(config, f)
        if all(isinstance(o, bool) for o in ok) and not isinstance(v, bool):
            raise ValueError(f"{name}.{f} must be True or False, got {v!r}")
        if v not in ok:
            raise ValueError(f"{name}.{f} must be one of {ok}, got {v!r}")
    if config.semantics not in ("lane", "warpgroup"):
        raise ValueError(f"{name}.semantics must be 'lane' or 'warpgroup', got "
                         f"{config.semantics!r}")
    _check_interpret(name, config.interpret)


# --- Triton-lowered GPU kernels (any NVIDIA GPU) -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TritonChunkConfig:
    """The Triton kernels of the chunk family: linear attention, simple GLA, GLA (vector gate),
    the delta rule, Gated DeltaNet and KDA (vector gate), and mLSTM (`kernels/gpu/`).

    chunk: C, rows per chunk (the op's chunk_size, clamped to [16, 128] and a power of two).
    sub_chunk: c, rows of the vector gate's sub-chunks (both factors of an off-diagonal block <= 1;
      the exact gate gradient is routed per sub-chunk, `kernels/gpu/intra.py`).
    block_k, block_v: tiles of the state [K, V] in the sequential state passes.
    block_v_out: value tile of the output kernel and of the backward's value loop.
    block_k_bwd: key tile of the backward kernel (the K axis of its grid).
    min_programs: the state passes halve their tiles (down to 32 x 16) while their grid has fewer
      programs than this (256, swept on an H100 and an H200: at B*H = 16 a [64, 64] tiling leaves
      64 programs, half the SMs idle through a pass that is sequential in T).
    fused_fwd: the forward as one state-and-output pass: True, False, or None to decide by the grid
      it would have; block_v_fused is its value tile.
    warps_* / stages_*: Triton's num_warps and num_stages of each kernel.
    spans: how the backward kernels and the UT inverse form the scalar gate's pair spans D and
      route the pair gradients to dg (`kernels/tiles.py`): "scan", running sums (Triton's tt.scan
      on the CUDA cores: D down the columns, the pairs along the rows, the per-row terms from the
      exact prefix / suffix sums, dg shifted one row and put back in XLA); "dot", 0/1 products on
      the tensor cores and masked [C, C] sums (the first exact version). Both exact.
    gla_bwd: the vector gate's backward (`decay.py`, `intra.py`): "rows", exp(Gin) from the exact
      prefix sums and the per-row terms routed by the intra kernel's sub-chunk products; "dots",
      every span and route as a 0/1 product in the inter-chunk kernel (the first exact version);
      "fold", "rows"' factors with the per-row terms routed in the inter-chunk kernel by two 0/1
      products into one dg part, which the intra kernel reads by sub-chunk rows: the kernels' HBM
      tensors of before the exact backward (one float32 [B, T, H, K] fewer written and read).
      "fold" is the default: on an H100 (bf16, T = 2048, H = 16, K = V = 128) gla's fwd+bwd took
      4.850 ms against "rows"' 5.169 (`benchmarks/results/bwd_gpu_*.json`, session 19).
      KDA's backward (`delta_bwd.py`) always takes "rows".
    gla_diag: the diagonal sub-chunk blocks of the GLA backward: "scan", [c, c, BK] tiles (the
      spans as running sums down the query rows, the pair routes as running sums along the keys
      then one masked sum; the mild path's off-diagonal blocks merged with dq / dk); "loop", c
      steps over key columns with two cross-row sums each (the first exact version).
    block_k_intra, warps_intra_bwd: key-channel tile (a grid axis) and warps of the GLA intra
      backward (`kernels/gpu/intra.py`; every term there is per channel but dA).
    dv_pass: where the decay family's backward kernel forms dv (`decay._backward_main`): "after",
      a second pass over the value tiles once the gate factors and the pair spans are formed (only
      the loop's accumulators live in it); "loop", inside the one value loop, from A and the gate
      factors formed before it (the kernel's structure before the exact backward).
    f32_dots: the products of float32 inputs (bf16 / fp16 inputs multiply on their own type):
      "ieee", IEEE float32 on the CUDA cores; "tf32x3", float32-accurate products on the tensor
      cores, three tf32 products of the split operands (as the UT inverse and the 0/1 span
      products already run). Measured on an H100 alone (session 35, one forward + backward;
      `experiments/benchmarks/f32_dots_gpu.py`, `benchmarks/results/f32_dots_NVIDIA_H100_80GB_
      HBM3.json`): "tf32x3" is within 3.7e-7 to 8.2e-7 of the chunk form under float32 matmuls
      where "ieee" is within 1.8e-7 to 8.3e-7, and 1.2x to 12x faster (the delta rule at B = 8,
      T = 2048, 16 heads of 128: 14.7 against 180.9 ms). Gated DeltaNet's fwd + bwd there, first
      over the H100's shared memory, runs with its delta passes unpipelined
      (`chunk_state.row_stages`; session 36: 21.1 against 186.3 ms), and the float32 check grid
      of the six chunk ops passed under "tf32x3" (sessions 36 and 38, every row within 8.2e-7 of
      the recurrent or chunk form: `benchmarks/results/check_gpu_NVIDIA_H100_80GB_HBM3_tf32x3
      {,_delta}.json`). The mLSTM kernels read this config too and have not yet run float32
      under "tf32x3" on a device, so "ieee" stays the default until they have. "auto" leaves
      float32 inputs to the chunk form (`kernels/gpu/common.py:auto_declines`).
    """

    chunk: int = 64
    sub_chunk: int = 16
    block_k: int = 64
    block_v: int = 64
    block_v_out: int = 64
    block_k_bwd: int = 128
    min_programs: int = 256
    warps_state: int = 4
    stages_state: int = 2
    warps_out: int = 4
    stages_out: int = 2
    warps_bwd: int = 8
    stages_bwd: int = 1
    warps_intra: int = 4
    fused_fwd: bool | None = None
    block_v_fused: int = 64
    warps_fused: int = 4
    stages_fused: int = 2
    spans: str = "scan"
    gla_bwd: str = "fold"
    gla_diag: str = "scan"
    block_k_intra: int = 32
    warps_intra_bwd: int = 4
    dv_pass: str = "after"
    f32_dots: str = "ieee"
    interpret: bool | None = None

    def __post_init__(self):
        name = type(self).__name__
        for f, allowed in (("spans", ("scan", "dot")), ("gla_bwd", ("rows", "dots", "fold")),
                           ("gla_diag", ("scan", "loop")), ("dv_pass", ("after", "loop")),
                           ("f32_dots", ("ieee", "tf32x3"))):
            if getattr(self, f) not in allowed:
                raise ValueError(f"{name}.{f} must be one of {allowed}, got {getattr(self, f)!r}")
        for f in ("chunk", "sub_chunk", "block_k", "block_v", "block_v_out", "block_k_bwd",
                  "block_v_fused", "block_k_intra"):
            val = getattr(self, f)
            if not _pow2(val) or val < 16:
                raise ValueError(f"{name}.{f} must be a power of two >= 16, got {val}")
        if self.chunk > 128 or self.chunk % self.sub_chunk:
            raise ValueError(f"{name}: chunk {self.chunk} must be <= 128 and a multiple of "
                             f"sub_chunk {self.sub_chunk}")
        for f in ("warps_state", "warps_out", "warps_bwd", "warps_intra", "warps_fused",
                  "warps_intra_bwd"):
            if getattr(self, f) not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name}.{f} must be 1, 2, 4, 8 or 16, got {getattr(self, f)}")
        for f in ("stages_state", "stages_out", "stages_bwd", "stages_fused"):
            if not 1 <= getattr(self, f) <= 6:
                raise ValueError(f"{name}.{f} must be in [1, 6], got {getattr(self, f)}")
        if self.min_programs < 1:
            raise ValueError(f"{name}.min_programs must be positive, got {self.min_programs}")
        _check_interpret(name, self.interpret)

    @classmethod
    def default(cls, device=None) -> TritonChunkConfig:
        return cls()

    def for_chunk(self, chunk_size: int) -> TritonChunkConfig:
        """This config at the op's chunk_size (a power of two in [16, 128])."""
        return dataclasses.replace(self, chunk=min(128, next_pow2(int(chunk_size))))


@dataclasses.dataclass(frozen=True)
class TritonScanConfig:
    """The Triton kernels of the element-wise scans (hgrn, diagonal_scan; `kernels/gpu/`).

    chunk, chunk_bwd: time steps unrolled per loop iteration (all their loads in flight at once);
      the op's chunk_size caps both. The backward reads three rows per step, hence its shorter
      chunk (registers); complex inputs (two planes per row) halve both.
    block_d: channels per program (a power of two), halved (down to min_block_d) while the grid has
      fewer than min_programs programs: the work is sequential in T, so parallelism is B * D / BD.
    warps: warps per program (None: BD / 32, one channel per thread, clamped to [1, 8]). A
      thread then holds a chunk's loaded rows, chunk * (2 forward, 3 backward) * planes floats.
    """

    chunk: int = 64
    chunk_bwd: int = 32
    block_d: int = 128
    min_block_d: int = 32
    min_programs: int = 2 * _DEFAULT_SMS
    warps: int | None = None
    stages: int = 1
    interpret: bool | None = None

    def __post_init__(self):
        name = type(self).__name__
        for f in ("block_d", "min_block_d"):
            if not _pow2(getattr(self, f)) or getattr(self, f) < 16:
                raise ValueError(f"{name}.{f} must be a power of two >= 16, got {getattr(self, f)}")
        for f in ("chunk", "chunk_bwd"):
            if not 1 <= getattr(self, f) <= 128:
                raise ValueError(f"{name}.{f} must be in [1, 128], got {getattr(self, f)}")
        if self.warps not in (None, 1, 2, 4, 8, 16):
            raise ValueError(f"{name}.warps must be None, 1, 2, 4, 8 or 16, got {self.warps}")
        _check_interpret(name, self.interpret)

    @classmethod
    def default(cls, device=None) -> TritonScanConfig:
        return cls(min_programs=2 * multiprocessors(device))

    def block(self, B: int, D: int) -> int:
        bd = min(self.block_d, next_pow2(D))
        while B * -(-D // bd) < self.min_programs and bd > self.min_block_d:
            bd //= 2
        return bd

    def num_warps(self, bd: int) -> int:
        return self.warps or max(1, min(8, bd // 32))


@dataclasses.dataclass(frozen=True)
class TritonSelectiveConfig:
    """The Triton kernel of the selective scan (Mamba-1; `kernels/gpu/selective.py`).

    chunk: C, steps between stored states (capped by the op's chunk_size; a program holds
    [C, BD, N] float32 tiles). block_d: channels per program, halved (down to min_block_d) while
    the grid has fewer than min_programs programs. parallel: take the time-parallel path for
    chunks whose decay span (-sum_t dt_t A over the chunk, every element) is at most `span` (needs
    C >= 16); other chunks, and every chunk when False, run step by step. span: the exponents are
    rebased to the chunk's midpoint, so factors reach e^{span / 2} (up to 80: e^40, far from
    float32's e^88); in interpret mode the parallel path's relative errors were ~2e-7 at spans up
    to 18 and ~5e-7 at 73 (the sequential path: ~1e-7).

    Defaults from the H200 runs (benchmarks/NOTES.md, B=4 T=4096 D=2048 N=16 bf16, fwd / fwd+bwd):
    chunk 8 (every chunk sequential) 2.79 / 5.99 ms against chunk 16 (parallel chunks) 3.10 / 9.53.
    """

    chunk: int = 8
    block_d: int = 32
    min_block_d: int = 16
    min_programs: int = 2 * _DEFAULT_SMS
    warps: int = 4
    warps_bwd: int = 4
    stages: int = 1
    parallel: bool = True
    span: float = 60.0
    interpret: bool | None = None

    def __post_init__(self):
        name = type(self).__name__
        for f in ("block_d", "min_block_d"):
            if not _pow2(getattr(self, f)):
                raise ValueError(f"{name}.{f} must be a power of two, got {getattr(self, f)}")
        if not 1 <= self.chunk <= 64:
            raise ValueError(f"{name}.chunk must be in [1, 64], got {self.chunk}")
        if self.warps not in (1, 2, 4, 8) or self.warps_bwd not in (1, 2, 4, 8):
            raise ValueError(f"{name}.warps, warps_bwd must be 1, 2, 4 or 8")
        if not 0.0 <= self.span <= 80.0:
            raise ValueError(f"{name}.span must be in [0, 80], got {self.span}")
        _check_interpret(name, self.interpret)

    @classmethod
    def default(cls, device=None) -> TritonSelectiveConfig:
        return cls(min_programs=2 * multiprocessors(device))

    def block(self, B: int, G: int, Dg: int) -> int:
        bd = min(self.block_d, next_pow2(Dg, 1))
        while B * G * -(-Dg // bd) < self.min_programs and bd > self.min_block_d:
            bd //= 2
        return bd


# --- Mosaic TPU kernels --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """The Mosaic TPU kernels of the chunk family (simple GLA, GLA, the delta rule; `kernels/tpu/`).

    chunk: time block per grid step (the chunk of the chunk-parallel form). None takes the op's
      `chunk_size`, rounded up to the dtype's sublane packing (8 rows for 32-bit, 16 for 16-bit).
      64 or 128 keep the [C, C] intra matrices one MXU tile.
    lane: K and V are zero-padded to a multiple of this (the vreg lane width and MXU edge).
    sub_chunk: GLA's sub-chunk (the vector gate's intra-chunk factoring); a power of 2, used as
      gcd(chunk, sub_chunk).
    vmem_limit_bytes: scoped VMEM limit handed to Mosaic (None: the compiler default).
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
        _check_interpret("TpuConfig", self.interpret)

    @classmethod
    def default(cls, device=None) -> TpuConfig:
        return cls()

    def chunk_for(self, chunk_size: int, itemsize: int) -> int:
        pack = 8 * max(1, 4 // itemsize)
        C = self.chunk or int(chunk_size)
        return -(-C // pack) * pack


@dataclasses.dataclass(frozen=True)
class TpuSelectiveConfig:
    """The Mosaic TPU kernel of the selective scan (`kernels/tpu/selective.py`).

    block_d: channels per program (lanes, a multiple of 128; lowered to the largest multiple of
    128 dividing each group's padded channels). tpu: chunk (the op's chunk_size when None),
    vmem_limit_bytes and interpret, as for the other TPU kernels.
    """

    block_d: int = 256
    tpu: TpuConfig = TpuConfig()

    def __post_init__(self):
        if self.block_d < 128 or self.block_d % 128:
            raise ValueError(f"TpuSelectiveConfig.block_d must be a positive multiple of 128, "
                             f"got {self.block_d}")

    @property
    def interpret(self):
        return self.tpu.interpret

    @classmethod
    def default(cls, device=None) -> TpuSelectiveConfig:
        return cls()

    def block(self, Dgp: int) -> int:
        bd = min(self.block_d, Dgp)
        while Dgp % bd:
            bd -= 128
        return bd


# --- Mosaic GPU kernels (Hopper: TMA, wgmma, warpgroups) -----------------------------------------

@dataclasses.dataclass(frozen=True)
class HopperChunkConfig:
    """The Mosaic GPU (Hopper, sm_90) kernels of the chunk family (`kernels/gpu/hopper/`):
    simple_gla (`decay.py`, `decay_grad.py`) and gla (`gla.py`, the vector gate). gla reads chunk,
    stages, pieces, semantics, approx_math, interpret and gla_grad_key_blocks; its
    chunk-parallel kernels (gates, grad) take one (b, h, chunk) per CTA (or one 64-key block
    of it) and ignore stages_grad, grad_programs, gates, grad_items, overlap and item_order, which
    shape simple_gla's.

    chunk: C, rows per chunk: 64 (one wgmma M tile; the [C, C] intra blocks stay in registers).
    stages: depth of the TMA pipeline of the sequential walks (forward, reverse state pass): chunks
      in flight in shared memory while one computes (2 or 3; at K = V = 128 a stage is 49 KB and
      the rest 96 KB, so 3 exceed the 227 KB of a CTA there: the kernel raises ValueError).
    stages_grad: the same for the chunk-parallel gradient kernel (97 KB a stage at K = V = 128).
    grad_programs: CTAs of the persistent gradient kernel (None: the device's SM count).
    semantics: the Mosaic GPU lowering, "lane" (explicit register layouts; the default of jax
      0.10) or "warpgroup" (the default of jax 0.11). The kernels lower under both.
    approx_math: let exp lower to the fast approximate instruction (ex2.approx).
    pieces: the two-level walk. Each sequence is cut into P pieces of whole chunks walked in
      parallel from a zero state (the state pass only), a short float32 scan over the pieces gives
      each its entering state, then the output pass walks every piece from it. None: the largest
      power of two P dividing the chunk count with B H P <= the SM count (1 where B H already
      fills the device); 1: the single-level walk. The backward's reverse walk likewise.
    gates: where the chunk-local cumulative gate is formed: "kernel" (from the raw log gates, in
      every kernel: one XLA transpose of g around the kernels) or "xla" (gate_rows: cumulative sums,
      exponentials and masks as XLA kernels, read by the kernels as rows). Both pass every check
      on an H200 ("kernel" since its cross-warpgroup race was fixed, session 9); the default is
      "xla", which timed as fast or faster there.
    grad_items: the gradient kernel's work item: "split" (one (b, h, chunk), its inputs and intra
      blocks loaded and formed once for all key tiles, shared by two compute warpgroups, the dq
      side and the dk side; the gate gradient's prefix sums in the kernel) or "tile" (one (b, h,
      chunk, 64-key tile), run 1's program; prefix sums in XLA).
    overlap: register work issued while each wgmma runs (the gate factors and E during q k^T,
      the scaling of o and of v during A v, the store of o and the state decay during the state
      update); False: the same work after each wait.
    item_order: the order of the persistent kernels' work items: "heads" (the head fastest, then
      the chunk: the CTAs running at once read the same rows of every head, whole rows of the
      [B, T, H, K] inputs) or "chunks" (the chunk fastest: at B = 1 the CTAs at once read 132
      chunks of one head, 256-byte pieces 4 KB apart).
    profile_dir: where a non-empty directory is named, every kernel call writes a Chrome trace
      of its named scopes (`jax.named_scope` in the kernel bodies; per CTA and warpgroup, at most
      256 ranges each: `experiments/benchmarks/kernel_report.py` reads them). Diagnostics only.
    gla_grad_key_blocks: gla's gradient kernel as one CTA per (b, h, chunk, 64-key block) (the
      key blocks are independent: dq, dk, dg are per key channel), its tiles aliased by phase
      (`plgpu.RefUnion`) and the states read in two halves of 64 values: 105 KB of SMEM instead
      of 217 KB, so two CTAs (eight warps) per SM where one ran, each half the work. The
      default: on an H100 (session 18, T = 2048) the gradient kernel took 1.42 ms against the
      fused kernel's 4.38, the whole fwd+bwd 2.32 against 5.27 ms. False: the fused kernel, one
      CTA per (b, h, chunk) walking its key blocks (~1.6 KB of register spills a thread).
    """

    chunk: int = 64
    stages: int = 2
    stages_grad: int = 2
    grad_programs: int | None = None
    semantics: str = "lane"
    approx_math: bool = False
    interpret: bool | None = None
    profile_dir: str = ""
    pieces: int | None = None
    gates: str = "xla"
    grad_items: str = "split"
    overlap: bool = True
    item_order: str = "heads"
    gla_grad_key_blocks: bool = True

    def __post_init__(self):
        name = type(self).__name__
        if self.pieces is not None and (self.pieces < 1 or self.pieces & (self.pieces - 1)):
            raise ValueError(f"{name}.pieces must be None or a power of two, got {self.pieces}")
        if self.gates not in ("kernel", "xla") or self.grad_items not in ("split", "tile"):
            raise ValueError(f"{name}: gates must be 'kernel' or 'xla' and grad_items 'split' "
                             f"or 'tile', got {self.gates!r}, {self.grad_items!r}")
        if self.chunk != 64:
            raise ValueError(f"{name}.chunk must be 64 (one wgmma tile), got {self.chunk}")
        if self.item_order not in ("heads", "chunks"):
            raise ValueError(f"{name}.item_order must be 'heads' or 'chunks', got "
                             f"{self.item_order!r}")
        if self.stages not in (2, 3) or self.stages_grad not in (1, 2):
            raise ValueError(f"{name}: stages must be 2 or 3 and stages_grad 1 or 2, got "
                             f"{self.stages}, {self.stages_grad}")
        if self.grad_programs is not None and self.grad_programs < 1:
            raise ValueError(f"{name}.grad_programs must be positive, got {self.grad_programs}")
        _check_hopper(self, gla_grad_key_blocks=(False, True))

    @classmethod
    def default(cls, device=None) -> HopperChunkConfig:
        return cls(grad_programs=multiprocessors(device))

    def for_chunk(self, chunk_size: int) -> HopperChunkConfig:
        """The op's chunk_size does not change the kernels' chunk (64: one wgmma tile)."""
        return self

    def pieces_for(self, BH: int, N: int, sms: int) -> int:
        """P of the two-level walk for B H sequences of N chunks (a power of two dividing N)."""
        P = self.pieces or max(1, sms // max(BH, 1))
        P = 1 << (P.bit_length() - 1)
        while N % P:
            P //= 2
        return P


# A chunk step of the delta state pass (u = U - W S, then the state update: no q S, no A u, no o)
# against one of the output walk: a guess from the products per step, until measured.
STATE_STEP = 0.6


@dataclasses.dataclass(frozen=True)
class HopperDeltaConfig:
    """The Mosaic GPU (Hopper, sm_90) kernels of the delta rule and Gated DeltaNet
    (`kernels/gpu/hopper/delta.py`, `delta_bwd.py`).

    chunk: C, rows per chunk: 64 (one wgmma M tile).
    stages: depth of the TMA pipeline of the two sequential walks (2: at K = V = 128 a stage is
      66 KB forward and 75 KB in reverse; 3 do not fit in the 227 KB of a CTA: ValueError).
    stages_prep: the same for the chunk-parallel UT kernel (32 KB a stage at K = V = 128; one
      consumer warpgroup: a second one on its own chunks took 0.289 ms against 0.262 on an H200,
      T = 2048, when the kernel spilled registers).
    stages_grad: the same for the chunk-parallel gradient kernel (98 KB a stage at K = V = 128).
    programs: CTAs of the persistent kernels (UT, gradient); None: the device's SM count. Under
      `prep_two_ctas` the UT kernel runs twice as many (two to an SM).
    walk_split: the two walks' value blocks of 64 in CTAs of their own, one consumer warpgroup
      each, grid (B, H, V / 64) (True), or as the consumer warpgroups of one CTA per (b, h)
      (False). None: split where the split grid fits the SMs in one wave (B H V / 64 <= their
      count), so that no SM runs two blocks' chains of dependent wgmmas at once (split, the
      reverse walk also has the SMEM to read the forward's A^T rather than form it).
    pieces: the two-level walks. The sequence is cut into P pieces of whole chunks; a state pass
      walks every piece at once over K + V columns from [I | 0] (piece 0 from [I | h0]) and so
      yields its affine map S_end = M S_start + E, a float32 scan over the pieces gives each its
      entering state, and the output pass walks every piece from it; the reverse walk likewise,
      from the last piece (its E columns from the final state's cotangent).
      None: the P (a power of two dividing the chunk count, pieces of at least 8 chunks) that
      `pieces_for`'s count of chunk steps makes fastest, 1 where none beats the single-level
      walk (at the anchor shapes: P = 4 at T = 32768, else 1).
    semantics, approx_math, item_order: as `HopperChunkConfig` (the order of the UT and gradient
      kernels' items).
    profile_dir: as `HopperChunkConfig`.
    prep_two_ctas: the UT kernel as CTAs of one warpgroup that loads its own chunks into one
      input slot (stages_prep must be 1: ValueError otherwise) and writes A, -W, U (and T) out of
      the slots and tiles it read them from: 82 KB of SMEM at K = V = 128, so two CTAs share an
      SM (2 programs per SM) and their two chains of dependent wgmmas hide each other's latency
      (the kernel is latency-bound: ~13 dependent wgmma round trips a chunk). With a producer
      warpgroup (232 + 40 registers a thread) one CTA takes most of the register file. False
      until timed on the device.
    prep_inverse: how the UT kernel inverts I + L. "doubling": recursive doubling from b = 1, five
      steps of two dependent [64, 64] wgmmas. "blocks": the 16 x 16 diagonal blocks by forward
      substitution on the CUDA cores (one column a thread, in float32), then the doubling's last
      two steps merge them (16 -> 32 -> 64): 4 dependent wgmmas instead of 10; 35 KB more SMEM
      (not with `prep_two_ctas`, which takes "doubling"). The Newton step follows either.
      "blocks" is the default: 0.230 ms against 0.275 for the UT kernel on an H100 (session 18,
      T = 2048), its -W, U, A within 5e-5 of the doubling's there.
    """

    chunk: int = 64
    stages: int = 2
    stages_prep: int = 2
    stages_grad: int = 2
    programs: int | None = None
    semantics: str = "lane"
    approx_math: bool = False
    interpret: bool | None = None
    profile_dir: str = ""
    item_order: str = "heads"
    walk_split: bool | None = None
    pieces: int | None = None
    prep_two_ctas: bool = False
    prep_inverse: str = "blocks"

    def __post_init__(self):
        name = type(self).__name__
        _check_hopper(self, stages=(2, 3), stages_prep=(1, 2, 3), stages_grad=(1, 2),
                      item_order=("heads", "chunks"), prep_inverse=("doubling", "blocks"),
                      prep_two_ctas=(False, True))
        if self.chunk != 64:
            raise ValueError(f"{name}.chunk must be 64 (one wgmma tile), got {self.chunk}")
        if self.prep_two_ctas and self.prep_inverse == "blocks":
            raise ValueError(f"{name}.prep_inverse='blocks' needs 35 KB of SMEM that "
                             "prep_two_ctas does not have: with prep_two_ctas=True set "
                             "prep_inverse='doubling'")
        if self.prep_two_ctas and self.stages_prep != 1:
            raise ValueError(f"{name}.prep_two_ctas takes one input stage: stages_prep must be 1, "
                             f"got {self.stages_prep}")
        if self.pieces is not None and (self.pieces < 1 or self.pieces & (self.pieces - 1)):
            raise ValueError(f"{name}.pieces must be None or a power of two, got {self.pieces}")
        if self.walk_split not in (None, True, False):
            raise ValueError(f"{name}.walk_split must be None, True or False, got "
                             f"{self.walk_split!r}")
        if self.programs is not None and self.programs < 1:
            raise ValueError(f"{name}.programs must be positive, got {self.programs}")

    @classmethod
    def default(cls, device=None) -> HopperDeltaConfig:
        return cls(programs=multiprocessors(device))

    def pieces_for(self, BH: int, K: int, V: int, N: int, sms: int) -> int:
        """P of the two-level walks for B H sequences of N chunks (a power of two dividing N).
        Unset, the P with the fewest chunk steps in sequence: the state pass's CTAs
        (B H P (K + V) / 64) in waves over the SMs times N / P steps of STATE_STEP each, plus
        the output pass's (B H P V / 64 CTAs) times N / P; the single-level walk takes N."""
        if self.pieces is not None:
            P = self.pieces
            while N % P:
                P //= 2
            return P
        waves = lambda ctas: -(-ctas // sms)                     # noqa: E731
        best, cost = 1, float(N)
        P = 2
        while N % P == 0 and N // P >= 8:
            c = (waves(BH * P * (K + V) // 64) * STATE_STEP + waves(BH * P * V // 64)) * (N // P)
            if c < cost:
                best, cost = P, c
            P *= 2
        return best

    def split_walk(self, BH: int, NW: int, sms: int) -> bool:
        """Whether the walks of B H sequences with NW value blocks run a CTA per block."""
        if NW == 1:
            return False
        return BH * NW <= sms if self.walk_split is None else self.walk_split

    def for_chunk(self, chunk_size: int) -> HopperDeltaConfig:
        """The op's chunk_size does not change the kernels' chunk (64: one wgmma tile)."""
        return self


@dataclasses.dataclass(frozen=True)
class HopperSelectiveConfig(_OwnChunk):
    """The Mosaic GPU (Hopper) kernels of the selective scan (`kernels/gpu/hopper/selective.py`).

    chunk: C, steps per TMA tile and between the states stored for the backward (which keeps the
      C recomputed [64, N] states of a chunk in registers: 8 float32 values a thread each at
      N = 16, so C = 16 takes 128 registers).
    stages: chunks in flight in shared memory (TMA) while one computes.
    semantics, interpret: as `HopperChunkConfig`.
    approx_math: as `HopperChunkConfig`; on by default here, where the walk is bound by one exp per
      (t, d, n): on an H100 (B = 4, T = 4096, D = 2048, N = 16, session 19) the forward took 0.615
      ms with it against 1.775 without, fwd+bwd 5.65 against 11.45 (the accurate exp's
      instruction sequence is on every step's dependency chain). The approximate exp's relative
      error (~1e-6 at these exponents) is far below the kernel's bf16 inputs' rounding.
    profile_dir: as `HopperChunkConfig`.
    per_thread_forward: the forward in the per-thread layout (`_forward_threads`,
      `thread_channels` a warpgroup), a channel's N states scalars in its threads' registers (no
      sum over a tile's row per step), writing the states the backward reads in the same layout.
      On: with thread_channels = 64, 0.536 ms against the tile forward's 0.622 (H100, B = 4,
      T = 4096, D = 2048, N = 16, session 20).
    per_thread_backward: the backward in the per-thread layout (`_backward_threads`,
      `thread_channels` a warpgroup), the states and their cotangents scalars in registers, the
      chunk's states recomputed in sub-chunks of 64 / gcd(64, 2 Np) steps, dB / dC summed over
      the channels once per sub-chunk through SMEM, no auto barriers (the channels per group a
      multiple of thread_channels; at width 128 chunk 32 does not fit SMEM at N = 16).
      Independent of per_thread_forward (both write the states it reads). On: fwd+bwd 2.370 ms
      with both per-thread kernels at 64 channels a CTA, against 5.647 for the tile kernels and
      3.576 at 128 channels (same run as above; jla's mamba1 1.873).
    thread_channels: channels per CTA (one warpgroup) of the two per-thread kernels. 128: one
      channel a thread (grid (B, D / 128): 64 CTAs at B = 4, D = 2048, half of an H100's SMs
      idle). 64: two threads a channel, each owning N / 2 of its states, the per-step sums over
      n finished by one shuffle between the pair (grid (B, D / 64): 128 CTAs there; the channels
      per group a multiple of 64; the default). 32: four threads a channel, N / 4 states each,
      two shuffles a sum (256 CTAs there; ptxas proxy 196 registers in the backward, ~63 KB SMEM:
      two CTAs an SM to hide the step's latency, for ~1.24x the grid's instructions). Timed
      (H100, session 21, same shape): both kernels at 32, fwd+bwd 2.600 ms sync against 2.503
      at 64 (backward kernel 1.81 against 1.76 ms, forward 0.52 against 0.48); with chunk 32
      too, 2.884 (backward 2.11): the walk is not latency-bound, so 64 stays. Same results to
      float32 rounding.
    """

    chunk: int = 16
    stages: int = 3
    semantics: str = "lane"
    approx_math: bool = True
    interpret: bool | None = None
    profile_dir: str = ""
    per_thread_forward: bool = True
    per_thread_backward: bool = True
    thread_channels: int = 64

    def __post_init__(self):
        _check_hopper(self, chunk=(8, 16, 32), stages=(1, 2, 3, 4),
                      per_thread_forward=(False, True), per_thread_backward=(False, True),
                      thread_channels=(32, 64, 128))


@dataclasses.dataclass(frozen=True)
class HopperMlstmConfig(_OwnChunk):
    """The Mosaic GPU (Hopper) mLSTM kernels, forward and backward (`kernels/gpu/hopper/mlstm.py`).

    chunk: L, tokens between the stored chunk states (TFLA's two-level tiling: the kernels walk
      L / 64 tiles of 64 per tile, so the forward fits SMEM at L = 256 with K = V = 128; the
      backward's query kernel only up to L = 128 there, L = 256 at K = V = 64).
    semantics, approx_math, interpret: as `HopperChunkConfig`.
    profile_dir: as `HopperChunkConfig`.
    states: how XLA forms the chunk states the kernels read ("auto": "matmul" up to
      `MATMUL_CHUNKS` chunks, the range timed, else "scan"). "scan": the float32 chunk recurrence
      as a `lax.scan` of Tp / L serial steps over [C | n] [B, H, K, V + 1] (XLA differentiates
      the scan in reverse). "matmul": no serial loop: the chunk stabiliser by a max-plus
      associative scan over the chunks, then every entering state at once as a float32
      [NL + 1, NL] x [NL, K V] product of per-(b, h) decay weights (each <= 1, their exponents
      summed over the chunks between, not differenced) with the per-chunk updates, C and n kept
      apart (no V + 1 column, no [NL, B, H] transposes). The product grows as NL^2: 2 B H NL^2 K V
      float32 FLOPs (4.3 G at B H = 32, NL = 64; 34 G at B H = 16, NL = 256, where it would cost
      about as much as the loop). On an H100 (H = 16, K = V = 128, session 20) fwd+bwd 3.070 ms
      against the scan's 3.655 at B = 8, T = 2048 (NL = 16), 3.246 against 4.835 at B = 2,
      T = 8192 (NL = 64).
    fused_forward: the forward as one kernel (`kernels/gpu/hopper/mlstm_fused.py`): a CTA per
      (b, h, 64 value columns) walks the 64-token tiles in order with the state (C, n) on chip
      (a TMA producer warpgroup, a 3-slot ring, ~182 KB SMEM at K = V = 128), no chunk-state
      pass in XLA; under differentiation it also writes the chunk states (every `chunk` tokens)
      the unchanged backward reads, whose XLA VJP of the states (`states`) stays. On: the
      forward 0.359 ms against 1.109 (scan states) and 0.770 (matmul) at B = 8, T = 2048; 0.706
      against 1.535 and 0.878 at B = 2, T = 8192 (H100, session 20; jla 0.636 and 0.695). Its
      fwd+bwd with the scan states matched the unfused one's (3.717 against 3.655); with the
      matmul states (the default pair) 3.144 ms sync at B = 8, T = 2048 and 3.665 at B = 2,
      T = 8192 (H100, session 21; jla 2.278 and 2.498).
    form: "tiles", the kernels above; "simple_gla": the stabilised state as simple GLA on
      rescaled keys, through the simple-GLA kernels (`HopperChunkConfig` defaults, this config's
      semantics and interpret), the normaliser in XLA (`kernels/gpu/hopper/mlstm_gla.py`; the
      other fields unused). Timed (H100, session 21): fwd+bwd 2.711 / 2.946 ms sync at the
      two shapes above, faster than "tiles" (3.144 / 3.665) and behind jla (2.278 / 2.498);
      the forward 0.853 / 0.931 against "tiles" 0.516 / 0.854, so "tiles" stays the default.
    """

    chunk: int = 128
    semantics: str = "lane"
    approx_math: bool = False
    interpret: bool | None = None
    profile_dir: str = ""
    states: str = "auto"
    fused_forward: bool = True
    form: str = "tiles"

    MATMUL_CHUNKS: typing.ClassVar[int] = 64

    def __post_init__(self):
        _check_hopper(self, chunk=(64, 128, 256), states=("auto", "scan", "matmul"),
                      form=("tiles", "simple_gla"))
