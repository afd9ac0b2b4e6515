"""What every Triton kernel of the chunk family shares: the entry's padding and document index, tile
choice, block specs on the public layout, and the in-kernel view of one chunk (`Ctx`, `Chunk`):
its document masks and gate factors, formed by `linear_jax.kernels.tiles`.

Every kernel reads the public layout `[B, T, H, X]` in place (no transposes): a block spec squeezes
B and H, keeps T whole or one chunk, and tiles X. Padded shapes: T to a multiple of the chunk C,
K to a power of two (one tile, for q k^T), V to a multiple of 16 (then of the value block BV).
Gates enter as the log decays g, float32 `[B, T, H]` (scalar gate) or `[B, T, H, K]` (vector
gate), and as their chunk-local prefix sums G_i = sum_{s<=i} g_s (`prefix_sums`, XLA, inside the
custom_vjp: not differentiated). The backward kernels form every span they need from exactly the
gates inside it (`tiles`) and return dg itself, routed through the spans: nothing is subtracted, so
dg stays exact at strong decay. The forward kernels and the reverse state pass read G and form
exp(G_i - G_j), exp(G_last - G_j) as differences (`Chunk.prefix`): values only, accurate to
eps * |G| relative (the kernels' accuracy before the exact backward; the pair terms this affects
are those decayed below e^-|G| eps^-1, far below the outputs' rounding), never differentiated.
Why not the exact spans there too: on an H200 (bf16, T = 2048, B = 8, H = 16, K = V = 128) masked
[C, C] sums and 0/1 products inside the sequential passes made simple_gla's forward 0.34 ms
against 0.20 and its forward + backward 1.64 against 0.93, gla 1.61 / 5.52 against 1.03 / 3.29:
each step of a pass that is sequential in T pays their latency. The parallel kernels pay
throughput, which they have to spare. The document index is `doc_index(segment_ids)`, int32
`[B, T]`, edge-padded.

Matmul precision: bf16 / fp16 inputs run dots on their own type with float32 accumulation;
float32 inputs run IEEE float32 dots (Triton's float32 default is tf32), or with the config's
`f32_dots="tf32x3"` float32-accurate products on the tensor cores. The 0/1 mask products of
the gate spans run on the tensor cores: 3xTF32 (float32-accurate) for float32 inputs, tf32 for
bf16 / fp16 (below those inputs' own rounding).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.configs import TritonChunkConfig, next_pow2
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params
from linear_jax.ops.common.chunking import doc_index, pad_time

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a kernel body needs to know besides its refs: the config, the gate kind ("none",
    "scalar", "vector"), whether documents are packed, whether the inputs are float32."""

    cfg: TritonChunkConfig
    kind: str = "none"
    has_seg: bool = False
    f32: bool = True

    @property
    def C(self) -> int:
        return self.cfg.chunk

    @property
    def split_dots(self) -> bool:
        """Whether float32 products run as 3xTF32 (`TritonChunkConfig.f32_dots`)."""
        return self.f32 and self.cfg.f32_dots == "tf32x3"

    def dot(self, a, b, **kw):
        if self.split_dots:
            return dot(a.astype(F32), b.astype(F32), split_tf32=True,
                       interpret=interpret(self.cfg), **kw)
        return dot(a, b, exact=self.f32, **kw)

    def mask_dot(self, m, x):
        return dot(m, x, split_tf32=self.f32, interpret=interpret(self.cfg))

    def call(self, kernel, *, grid, in_specs, out_specs, out_shape, warps, stages, name):
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                              out_shape=out_shape, name=name, interpret=interpret(self.cfg),
                              compiler_params=triton_params(self.cfg, warps, stages))


class Chunk:
    """Chunk n seen from a kernel: iotas and document masks (`tiles.doc_masks`), from the whole-T
    document index (doc_ref; unused without documents)."""

    def __init__(self, ctx: Ctx, n, doc_ref=None):
        self.ctx, C = ctx, ctx.C
        self.row, self.col = tiles.iotas(C)
        dc = dr = None
        if ctx.has_seg:
            rel = doc_ref[pl.ds(n * C, C)] - doc_ref[jnp.maximum(n * C - 1, 0)]
            dc, dr = rel[:, None], rel[None, :]
        self.masks = tiles.doc_masks(dc, dr, self.row, self.col)
        self._rel = (dc, dr)

    def prefix(self, G, G_last, pairs: bool = False):
        """(decay [C, C] or None, e_in, e_out, a) from the chunk's exact prefix sums G (scalar
        gate: G [C], G_last a scalar; vector gate: G [C, X], G_last [1, X], and a is a column
        [X, 1]), for the forward and the reverse state pass (module docstring: values only, never
        differentiated)."""
        vec = G.ndim == 2
        Gc = G if vec else G[:, None]
        decay = jnp.exp(jnp.where(self.masks[0], Gc - G[None, :], -jnp.inf)) if pairs else None
        # a vector gate's factors are [C, X] tiles that become tensor-core operands: their
        # document cut is a float factor (`tiles.doc_factors` says why)
        factors = tiles.doc_factors(*self._rel) if vec and self._rel[0] is not None else None
        e_in, e_out, a = tiles.masked_factors(self.masks, jnp.exp(Gc), jnp.exp(G_last - Gc),
                                              jnp.exp(G_last), factors)
        return decay, e_in, e_out, (a.reshape(-1, 1) if vec else a)

    def scalar(self, g, pairs: bool = True):
        """(decay [C, C] (None without `pairs`), e_in, e_out [C, 1], a [1, 1]) of the scalar gates
        g [C] (`tiles.scalar_gate_terms`); g None: no gate, the masks as 0/1 factors."""
        if g is not None:
            return tiles.scalar_gate_terms(g[:, None], g[None, :], self.masks, self.row, self.col,
                                           self.ctx.mask_dot if pairs else None)
        C = self.ctx.C
        same, in_rows, out_rows, keep = self.masks
        ones = lambda m, shape: jnp.ones(shape, F32) if m is None else jnp.where(m, 1.0, 0.0)
        return (jnp.where(same, 1.0, 0.0) if pairs else None, ones(in_rows, (C, 1)),
                ones(out_rows, (C, 1)), ones(keep, (1, 1)))

    def exact(self, g, G, R, G_last, pairs: bool = True):
        """(decay, e_in, e_out, a) of the scalar gate as `scalar`, by the config's `spans`: "dot"
        as `scalar` (from g alone); "scan", D by `tiles.scan_pair_spans` and the per-row factors
        from the exact prefix sums G [C] (Gin), suffix sums R [C] (`suffix_sums`) and G_last
        (Gtot) the kernel read. Any of G, R, G_last may be None where its factor is not used."""
        if self.ctx.cfg.spans == "dot" or g is None:
            return self.scalar(g, pairs)
        decay = None
        if pairs:
            D = tiles.scan_pair_spans(g, self.row, self.col)
            decay = jnp.exp(jnp.where(self.masks[0], D, -jnp.inf))
        ex = lambda x, f: None if x is None else jnp.exp(f(x))
        return (decay,) + tiles.masked_factors(self.masks, ex(G, lambda x: x[:, None]),
                                               ex(R, lambda x: x[:, None]),
                                               ex(G_last, lambda x: jnp.reshape(x, (1, 1))))

    def exact_grad(self, P, d_gin, d_r, d_tot):
        """dL/dg [C] of the scalar gate by the config's `spans` ("dot": `scalar_grad`, dg itself;
        "scan": `tiles.scan_gate_grad`, dg one row early, put back by `tiles.roll_gate_grad`).
        d_gin, d_r [C, 1] or None, d_tot [1, 1] or None."""
        C = self.ctx.C
        if self.ctx.cfg.spans == "dot":
            z = lambda x, shape: jnp.zeros(shape, F32) if x is None else x
            return self.scalar_grad(P, z(d_gin, (C, 1)), z(d_r, (C, 1)), z(d_tot, (1, 1)))
        flat = lambda x: None if x is None else x.reshape(-1)
        return tiles.scan_gate_grad(P, flat(d_gin), flat(d_r),
                                    None if d_tot is None else d_tot.reshape(()), self.row,
                                    self.col)

    def vector(self, g, want_in=True, want_out=True):
        """(e_in, e_out [C, X], a [1, X]) of the vector gate tile g [C, X]."""
        return tiles.vector_gate_terms(g, self.masks, self.row, self.col, self.ctx.mask_dot,
                                       want_in, want_out)

    def scalar_grad(self, P, d_gin, d_r, d_tot):
        """dL/dg [C] of the scalar gate (`tiles.scalar_gate_grad`; P None: no pair term)."""
        return jnp.sum(tiles.scalar_gate_grad(P, d_gin, d_r, d_tot, self.row, self.col,
                                              self.ctx.mask_dot), axis=1)

    def vector_grad(self, d_gin, d_r, d_tot):
        """dL/dg [C, X] of the vector gate's per-row terms (`tiles.vector_gate_grad`)."""
        return tiles.vector_gate_grad(d_gin, d_r, d_tot, self.row, self.col, self.ctx.mask_dot)


@dataclasses.dataclass(frozen=True)
class Padded:
    """An op entry's shapes: T to a multiple of C, K to a power of two (one tile for q k^T), V to
    a multiple of 16; `dtype` what the kernels read (bf16 / fp16 as given, anything else float32).
    """

    cfg: TritonChunkConfig
    T: int
    Tp: int
    Kp: int
    Vp: int
    dtype: object

    def __call__(self, x, X):
        """A [B, T, H, *] input cast to the kernels' dtype and zero-padded to [B, Tp, H, X]."""
        x = pad_time(x.astype(self.dtype), self.Tp)
        return jnp.pad(x, ((0, 0),) * 3 + ((0, X - x.shape[-1]),))

    def state(self, S, B, H, K=None, V=None):
        """An initial state [B, H, K(, V)] in float32, zero-padded (zeros when None)."""
        shape = (B, H, self.Kp) + (() if V is None else (self.Vp,))
        if S is None:
            return jnp.zeros(shape, F32)
        widths = [(0, p - d) for p, d in zip(shape, S.shape, strict=True)]
        return jnp.pad(S.astype(F32), widths)

    def gate(self, g):
        """g [B, T, H(, K)] float32, zero-padded in T (and K)."""
        g = pad_time(g.astype(F32), self.Tp)
        return g if g.ndim == 3 else jnp.pad(g, ((0, 0),) * 3 + ((0, self.Kp - g.shape[-1]),))

    def scalars(self, x, mode="constant"):
        """A per-token [B, T, H] (or [B, T]) input, float32, padded in T."""
        return pad_time(x.astype(F32), self.Tp, mode=mode)


MAX_K = 256


def accepts(q, k, v, *rest) -> str | None:
    """Whether the Triton chunk kernels take these widths (None) or why not: K at most `MAX_K`.
    Every family has passes that hold whole [C, K] key rows (K is one tile, for q k^T), and past
    K = 256 these outgrow shared memory even unpipelined. Compiled for sm_90 on a CPU
    (`experiments/benchmarks/kernel_smem.py`, float32, K = V = 512), where an H100 gives a block
    232,448 B: the delta rule's one-pass forward asked 262,152 B, its output kernel 262,144 and
    its reverse state pass 270,336 (session 27); simple_gla's one-pass forward 262,152 and its
    output kernel 262,144 (session 29). At 256 every kernel of every op asks at most 163,840 B,
    and the kernels of gla and Gated DeltaNet (H100, session 29), simple_gla and linear attention
    (session 30) passed their device checks there (`check_gpu`). Values are
    tiled, so V is free: at K = 256, V = 512 (Gated DeltaNet's layer at d512) every delta kernel
    asked at most 147,456 B (session 28) and passed its check (session 29). "auto" takes the chunk
    form past 256; naming the kernel raises this message."""
    K, V = q.shape[-1], v.shape[-1]
    if K > MAX_K:
        return (f"the Triton kernels take K of at most {MAX_K} (past it the key rows ask more "
                f"shared memory than a GPU has), got K={K}, V={V}; use impl='chunk'")
    return None


def compute_dtype(q, v):
    """The type the kernels multiply in: bf16 / fp16 as given, anything else float32."""
    dt = jnp.result_type(q, v)
    return dt if dt in (jnp.bfloat16, jnp.float16) else F32


def auto_declines(q, k, v, *rest) -> str | None:
    """Why "auto" leaves these inputs to the chunk form (None: it takes the kernels): float32. The
    kernels multiply float32 on the CUDA cores (`TritonChunkConfig.f32_dots="ieee"`, the default),
    and on an H100 (session 35, alone on the GPU, one forward + backward, float32 in and the chunk
    form under float32 matmul precision; `benchmarks/results/f32_dots_NVIDIA_H100_80GB_HBM3.json`)
    the chunk form was faster in 7 of the 9 cells measured: at the language-model shape (B = 8,
    T = 2048, 16 heads of K = V = 128) the delta rule 12.2 ms against 180.9, simple_gla 6.7 against
    79.3, gla 22.3 against 60.2, linear attention 5.4 against 82.5; at the parity protocol's (768
    rows, T = 40, 4 heads of 32) the delta rule 2.7 against 10.7 and Gated DeltaNet 3.2 against
    9.8, where gla (4.5 against 2.3) and simple_gla (1.1 against 1.0) were the exceptions. bf16 and
    fp16 inputs reach the tensor cores and keep the kernels; naming them runs them on float32."""
    if compute_dtype(q, v) == F32:
        return ("float32 inputs: the Triton kernels multiply them on the CUDA cores, slower than "
                "the chunk form (measured on an H100)")
    return None


def entry(q, v, segment_ids, chunk_size, config):
    """(Padded, doc [B, Tp] int32) of an op entry: the config at the op's chunk size (None: the
    device default; the registry always passes one) and the edge-padded document index."""
    cfg = (config or TritonChunkConfig.default()).for_chunk(chunk_size)
    B, T, _, K = q.shape
    C = cfg.chunk
    p = Padded(cfg, T, -(-T // C) * C, next_pow2(K), -(-v.shape[-1] // 16) * 16,
               compute_dtype(q, v))
    doc = (jnp.zeros((B, p.Tp), jnp.int32) if segment_ids is None else
           pad_time(doc_index(segment_ids), p.Tp, mode="edge").astype(jnp.int32))
    return p, doc


def gated_entry(q, v, g, segment_ids, chunk_size, config):
    """`entry` for the ops with a log-decay gate g (None, [B, T, H] or [B, T, H, K]): (Padded,
    doc, the Ctx of g's kind, g padded in float32: zeros [B, Tp, H] where there is none)."""
    p, doc = entry(q, v, segment_ids, chunk_size, config)
    kind = "none" if g is None else ("scalar" if g.ndim == 3 else "vector")
    ctx = Ctx(p.cfg, kind, segment_ids is not None, p.dtype == F32)
    B, _, H, _ = q.shape
    return p, doc, ctx, (jnp.zeros((B, p.Tp, H), F32) if g is None else p.gate(g))


def prefix_sums(g, C):
    """G_i = sum_{s<=i} g_s inside each chunk of C rows along T: [B, Tp, H(, K)] float32. Each is a
    sum of exactly the gates of its span (no difference); the kernels take it for values only."""
    B, Tp = g.shape[:2]
    return jnp.cumsum(g.reshape((B, Tp // C, C) + g.shape[2:]), axis=2).reshape(g.shape)


def suffix_sums(g, C):
    """R_j = sum_{s>j} g_s inside each chunk of C rows along T (0 on a chunk's last row): a
    reverse running sum of the gates after each row, no difference (XLA, values only)."""
    B, Tp = g.shape[:2]
    x = g.reshape((B, Tp // C, C) + g.shape[2:])
    after = jnp.concatenate([x[:, :, 1:], jnp.zeros_like(x[:, :, :1])], axis=2)
    return jnp.cumsum(after[:, :, ::-1], axis=2)[:, :, ::-1].reshape(g.shape)


def gate_grad_out(ctx, u):
    """dg from a backward kernel's gate rows, summed over K tiles: as written ("dot"), or put back
    one row (`tiles.roll_gate_grad`, "scan")."""
    return u if ctx.cfg.spans == "dot" else tiles.roll_gate_grad(u, ctx.C)


def custom_vjp(fwd, bwd):
    """jax.custom_vjp of `fwd(*args, residuals)` -> (out, residuals): the primal alone runs
    `fwd(..., residuals=False)`, which may take a form that keeps nothing."""
    f = jax.custom_vjp(lambda *a: fwd(*a, residuals=False)[0])
    f.defvjp(functools.partial(fwd, residuals=True), bwd)
    return f


def half_dtype(dtype):
    """Where a kernel stores an intermediate that its partner reads back in float32: float32 for
    float32 inputs, else bfloat16 (float16's range would not hold dW = -du S^T, say)."""
    return jnp.float32 if dtype == jnp.float32 else jnp.bfloat16


def value_block(Vp: int, want: int) -> int:
    """Largest power-of-two tile <= want dividing Vp (a multiple of 16)."""
    b = want
    while Vp % b:
        b //= 2
    return b


def state_tiles(BH: int, Kp: int, Vp: int, cfg: TritonChunkConfig, split_k: bool = True,
                min_bv: int = 16):
    """(BK, BV) of a sequential state pass over a grid (BH, Kp/BK, Vp/BV): the configured tiles,
    the larger one halved (BK >= 32, BV >= min_bv) while the grid has fewer than
    cfg.min_programs. (The delta rule's passes keep all of K and re-read W per value tile, hence
    their larger min_bv.)"""
    BK = min(cfg.block_k, Kp) if split_k else Kp
    BV = value_block(Vp, cfg.block_v)
    while BH * (Kp // BK) * (Vp // BV) < cfg.min_programs:
        can_k, can_v = split_k and BK > 32, BV > min_bv
        if can_k and (BK > BV or not can_v):
            BK //= 2
        elif can_v:
            BV //= 2
        else:
            break
    return BK, BV


# Block specs on the public layout. Grids put B*H first (bh // H, bh % H pick batch and head);
# `t` / `x` name the grid axes (counted after bh) that pick the time block and the last-dim tile.
def spec(H, tb, xb=None, t=None, x=None):
    """[B, T, H(, X)]: blocks of tb rows of T (all of T when t is None) and xb of X."""
    pick = lambda g, a: 0 if a is None else g[a]
    if xb is None:
        return pl.BlockSpec((None, tb, None), lambda bh, *g: (bh // H, pick(g, t), bh % H))
    return pl.BlockSpec((None, tb, None, xb),
                        lambda bh, *g: (bh // H, pick(g, t), bh % H, pick(g, x)))


def doc_spec(H, Tp):
    return pl.BlockSpec((None, Tp), lambda bh, *g: (bh // H, 0))


def state_spec(H, kb, vb, k=None, v=None):
    """[B, H, K, V] states, tiles kb x vb picked by grid axes k, v."""
    pick = lambda g, a: 0 if a is None else g[a]
    return pl.BlockSpec((None, None, kb, vb),
                        lambda bh, *g: (bh // H, bh % H, pick(g, k), pick(g, v)))


def states_spec(H, N, kb, vb, n=None, k=None, v=None):
    """[B, H, N, K, V] per-chunk states: all N (n None) or chunk g[n]; tiles kb x vb."""
    pick = lambda g, a: 0 if a is None else g[a]
    shape = (None, None, N if n is None else None, kb, vb)
    return pl.BlockSpec(shape, lambda bh, *g: (bh // H, bh % H, pick(g, n), pick(g, k), pick(g, v)))
