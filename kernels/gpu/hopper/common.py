"""Shared pieces of the Hopper (Mosaic GPU) kernels: the register/matmul vocabulary, SMEM tiles,
input checks and padding, the persistent grids' work items, the walks' frame (pieces, warpgroup
roles, state load, staging and write-back, outputs, barriers, launch), and the per-token gate rows
every scalar-gate kernel reads.

Layouts. A compute warpgroup holds [64, N] float32 tiles in the wgmma accumulator layout
(`Layout.WGMMA`); a vector indexed by the rows of such a tile is `WGMMA.reduce(1)` ("row"), one
indexed by its columns `WGMMA.reduce(0)` ("col"). bf16/fp16 tiles in SMEM are tiled (8, 64) with the
128-byte swizzle (the wgmma operand format, and what TMA writes); float32 tiles staged for TMA are
tiled (8, 32) with the same swizzle (an unswizzled float32 tile has no conflict-free transfer to
the accumulator layout).

Interpret mode (`HopperChunkConfig.interpret`, or any CPU backend): the kernels run in jax's GPU
interpreter, which executes TMA copies, mbarriers and SMEM loads and stores but (jax 0.10.2) neither
`layout_cast` nor a wgmma with a transposed or register operand; `Ops` then computes each matmul
with `jnp.dot` on the loaded tiles (float32 accumulation, as the wgmma) and drops layout hints. The
pipeline, indexing, masks and gate algebra are thus checked on a CPU; the wgmma operand plumbing
and the register layouts only on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.pallas import core as _pallas_core
from jax._src.state import types as _state_types
from jax.custom_derivatives import SymbolicZero

from linear_jax._compat import mosaic_gpu, mosaic_gpu_kernel
from linear_jax.ops.common.chunking import doc_index, pad_time
from linear_jax.ops.common.gates import rev_cumsum_excl

pl, plgpu = mosaic_gpu()
f32 = jnp.float32
LANES = 64          # columns of one swizzled bf16 tile (128 bytes): the unit of every K / V split


def interpreting(cfg) -> bool:
    """Whether the kernels run in the GPU interpreter: cfg.interpret, or None on a CPU backend."""
    if cfg.interpret is not None:
        return bool(cfg.interpret)
    return jax.default_backend() == "cpu"


def tile_transforms(dtype):
    """SMEM transforms of a wgmma / TMA tile of `dtype` (128-byte swizzle)."""
    cols = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(128))


def smem(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=tile_transforms(dtype))


def smem_bytes(per_sm: int = 1) -> int:
    """Dynamic SMEM a CTA may take on an H100 / H200 so that `per_sm` of them share an SM (its
    228 KB, 1 KB of it reserved per CTA: 227 KB for one, 113 KB each for two), less what the
    lowering adds for mbarriers and cross-warp reductions."""
    return (228 // per_sm - 1) * 1024 - 2048


def check_smem(name: str, scratch, fix: str = "lower the config's stages",
               per_sm: int = 1) -> int:
    """The SMEM bytes of a kernel's scratch list; ValueError past `smem_bytes(per_sm)` (export
    on a CPU would not notice: the limit is the device's), saying how to `fix` it."""
    total = 0
    for s in jax.tree.leaves(scratch, is_leaf=lambda x: not isinstance(x, (list, tuple))):
        if isinstance(s, plgpu.Barrier):
            continue
        n = jnp.dtype(s.dtype).itemsize
        for d in s.shape:
            n *= d
        total += n
    limit = smem_bytes(per_sm)
    if total > limit:
        raise ValueError(f"{name}: {total / 1024:.1f} KB of shared memory exceeds the "
                         f"{limit / 1024:.1f} KB a CTA can have"
                         + (f" with {per_sm} to an SM" if per_sm > 1 else "") + f"; {fix}")
    return total


def _is_ref(x) -> bool:
    if isinstance(x, _pallas_core.TransformedRef):
        return True
    return isinstance(jax.typeof(x), _state_types.AbstractRef)


# Registers per thread of the producer (TMA issue only) and consumer warpgroups.
PRODUCER_REGS, CONSUMER_REGS = 40, 232


class Ops:
    """The in-kernel vocabulary, compiled (wgmma, layouts) or interpreted (jnp.dot, no layouts)."""

    def __init__(self, interpret: bool, overlap: bool = True):
        self.interpret, self.overlap = interpret, overlap

    # -- layouts ---------------------------------------------------------------------------------
    def acc(self, x):
        """x as a [64, N] tile in the accumulator layout."""
        return x if self.interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)

    def row(self, x):
        """x [64] as a vector over the rows of an accumulator tile."""
        return x if self.interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))

    def col(self, x):
        """x [N] as a vector over the columns of an accumulator tile."""
        return x if self.interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(0))

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def zeros(self, shape):
        return self.acc(jnp.zeros(shape, f32))

    @staticmethod
    def rows_of(vec, shape):
        """A row vector broadcast over the columns of a [64, N] tile."""
        return lax.broadcast_in_dim(vec, shape, [0])

    @staticmethod
    def cols_of(vec, shape):
        """A column vector broadcast over the rows of a [M, N] tile."""
        return lax.broadcast_in_dim(vec, shape, [1])

    def producer(self, active, issue, count, stages: int, used_bar):
        """Where `active`, the producer warpgroup: few registers (the consumers get them), then
        the ring of `produce`."""
        @pl.when(active)
        def _():
            self.registers(PRODUCER_REGS, "decrease")
            produce(issue, count, stages, used_bar)

    def registers(self, n: int, action: str):
        if not self.interpret:
            plgpu.set_max_registers(n, action=action)

    def walk_warpgroups(self, w, NC: int, ring, col, NKB: int):
        """Decorator: the roles of a walk CTA's warpgroups. Warpgroup NC is the producer
        (`producer` of ring = (issue, count, stages, used_bar)); each one below is a consumer,
        which takes the registers the producer gave up and then runs the decorated
        consumer(vc, kblk) once: vc its 64 value columns (block `col`), kblk the NKB key blocks."""
        self.producer(w == NC, *ring)

        def consumers(consumer):
            @pl.when(w < NC)
            def _():
                self.registers(CONSUMER_REGS, "increase")
                consumer(pl.ds(col * LANES, LANES), [pl.ds(r * LANES, LANES) for r in range(NKB)])

        return consumers

    # -- matmuls ---------------------------------------------------------------------------------
    def _value(self, x, t):
        x = x[...] if _is_ref(x) else x
        return x.T if t else x

    def mm(self, *products, during=None):
        """Float32 results of several products issued together, then awaited once.

        Each product is (a, b, acc, ta, tb): a [M, K] (a ref in SMEM, or a bf16/fp16 array in the
        accumulator layout), b [K, N] a ref in SMEM, ta / tb read the ref transposed, acc None
        (start from zero) or a float32 [M, N] array to accumulate onto.

        during: a function of no arguments returning a pytree of arrays, traced between the
        issue of the wgmmas and the wait for them (register work that overlaps the tensor cores);
        then (results, its value) is returned. Only with products that start from zero. With
        `overlap` False it is traced after the wait instead (the same program, serialised)."""
        if self.interpret:
            outs = []
            for a, b, acc, ta, tb in products:
                r = jnp.dot(self._value(a, ta), self._value(b, tb), preferred_element_type=f32)
                outs.append(r if acc is None else acc + r)
            return outs if during is None else (outs, during())
        if during is not None and not self.overlap:          # wait first, then the rest
            return self.mm(*products), during()
        if during is not None:
            if any(p[2] is not None for p in products):
                raise ValueError("Ops.mm(during=...) takes products that start from zero")

            def issue(*accs):
                for ref, (a, b, _, ta, tb) in zip(accs, products, strict=True):
                    plgpu.wgmma(ref, plgpu.transpose_ref(a, (1, 0)) if ta else a,
                                plgpu.transpose_ref(b, (1, 0)) if tb else b)
                extra = during()
                return [ref[...] for ref in accs], extra     # the first read waits

            return pl.run_scoped(issue, *[plgpu.ACC(self._shape(p), f32) for p in products])
        shapes, inits = [], []
        for a, b, acc, ta, tb in products:
            m = a.shape[1] if ta else a.shape[0]
            n = b.shape[0] if tb else b.shape[1]
            shapes.append((m, n))
            inits.append(plgpu.ACC.init(self.zeros((m, n)) if acc is None else acc))

        def body(refs):
            for ref, (a, b, _, ta, tb) in zip(refs, products, strict=True):
                plgpu.wgmma(ref, plgpu.transpose_ref(a, (1, 0)) if ta else a,
                            plgpu.transpose_ref(b, (1, 0)) if tb else b)

        return list(pl.run_state(body)(tuple(inits)))

    @staticmethod
    def _shape(product):
        a, b, _, ta, tb = product
        return (a.shape[1] if ta else a.shape[0], b.shape[0] if tb else b.shape[1])

    def dot(self, a, b, acc=None, *, ta=False, tb=False):
        return self.mm((a, b, acc, ta, tb))[0]


def load(bar, slot, *pairs):
    """TMA copies of each (source view in GMEM, ring in SMEM) pair into the ring's `slot`, all
    completing on the barrier `bar`."""
    for src, ring in pairs:
        plgpu.copy_gmem_to_smem(src, ring.at[slot], bar)


def produce(issue, count, stages: int, used_bar):
    """The producer warpgroup's side of a ring of `stages` SMEM slots: items 0..stages-1 into slots
    0..stages-1, then item i into slot i % stages once the consumers released that slot (its
    previous item), then one more wait per slot, because a kernel must not end with a barrier's
    arrival unobserved. `issue(i, slot)` starts item i's TMA copies; `count` (static or traced)
    may be below `stages`."""
    for s in range(stages):
        pl.when(s < count)(lambda s=s: issue(s, s))

    @pl.loop(stages, count)
    def _(i):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(used_bar.at[slot])
        issue(i, slot)

    for s in range(stages):
        pl.when(s < count)(lambda s=s: plgpu.barrier_wait(used_bar.at[s]))


def program_items(items: int, progs: int):
    """(program pid, warpgroup, how many items it takes) of a persistent grid ("p", "wg") of
    `progs` programs over `items` work items, program pid taking items pid, pid + progs, ..."""
    pid, w = lax.axis_index("p"), lax.axis_index("wg")
    return pid, w, lax.div(items - pid + progs - 1, progs)


def grid_item(item, H: int, N: int, NKB: int | None = None, *, heads_fastest: bool = False):
    """(b, h, chunk n) of work item `item` of a chunk-parallel grid over B H N items, the chunk
    fastest (`heads_fastest`: the head fastest, then the chunk); with NKB key blocks a chunk,
    (b, h, n, kb) over B H N NKB items, the key block fastest of all."""
    head = ()
    if NKB is not None:
        kb, item = lax.rem(item, NKB), lax.div(item, NKB)
        head = (kb,)
    if heads_fastest:
        h, bn = lax.rem(item, H), lax.div(item, H)
        return (lax.div(bn, N), h, lax.rem(bn, N)) + head
    n, bh = lax.rem(item, N), lax.div(item, N)
    return (lax.div(bh, H), lax.rem(bh, H), n) + head


def key_tile_item(item, H: int, N: int, NKB: int, C: int, *, heads_fastest: bool = False):
    """(b, h, n, kb, the chunk's rows t, the key block's columns kr) of work item `item` of a
    chunk-parallel grid over B H N NKB items (`grid_item`), chunks of C rows."""
    b, h, n, kb = grid_item(item, H, N, NKB, heads_fastest=heads_fastest)
    return b, h, n, kb, pl.ds(n * C, C), pl.ds(kb * LANES, LANES)


def walk_setup(y, z, cfg, pieces: int = 1, stages: int | None = None):
    """(B, Tp, H, K, V, C, dt, N, NW, NKB, L, stages) of a chunk walk over y [B, Tp, H, K] and
    z [B, Tp, H, V] (dt: z's dtype): N chunks of C rows in `pieces` pieces of L, NW value blocks
    and NKB key blocks of 64, and the SMEM ring's slots (cfg.stages unless given), at most L."""
    B, Tp, H, K = y.shape
    V, C = z.shape[-1], cfg.chunk
    N = Tp // C
    L = N // pieces
    return (B, Tp, H, K, V, C, z.dtype, N, V // LANES, K // LANES, L,
            min(cfg.stages if stages is None else stages, L))


def walk_outputs(B, Tp, H, K, V, N, dt, *, final: bool, residuals: bool):
    """The outputs of a walk that writes o: o [B, Tp, H, V] in dt, with `final` the last state
    [B, H, K, V] float32, with `residuals` every chunk's entering state [B, H, N, K, V] in dt."""
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    out_type += [jax.ShapeDtypeStruct((B, H, K, V), f32)] if final else []
    out_type += [jax.ShapeDtypeStruct((B, H, N, K, V), dt)] if residuals else []
    return out_type


def state_outputs(B, H, P, K, V, decay=None):
    """The outputs of a walk's state pass: each of the P pieces' end state [B, H, P, K, V]
    float32 and, given the shape `decay` of a piece's total decay, those [B, H, P, *decay]."""
    out_type = [jax.ShapeDtypeStruct((B, H, P, K, V), f32)]
    return out_type + ([jax.ShapeDtypeStruct((B, H, P, *decay), f32)] if decay else [])


def walk_results(outs, *, out_mode: bool, final: bool, residuals: bool, decay_rows: int = 1):
    """A walk kernel's outputs (`walk_outputs` or `state_outputs`) as the walk returns them, a
    triple (o, the final state, the chunks' states) or a pair (end states, decays [B, H, P,
    decay_rows] as `piece_states` takes them: the first decay_rows entries of each piece's decay
    tile), None for each one not written."""
    outs = list(outs)
    if not out_mode:
        dp = outs[1] if len(outs) > 1 else None
        return outs[0], None if dp is None else dp.reshape(*dp.shape[:3], -1)[..., :decay_rows]
    o = outs.pop(0)
    S = outs.pop(0) if final else None
    return o, S, (outs.pop(0) if residuals else None)


def piece_states(E, d, s0, *, reverse: bool):
    """Each piece's entering state [B, H, P, K, V] of a two-level walk, from the pieces'
    zero-start end states E [B, H, P, K, V] and total decays d [B, H, P, K] per key row (or
    [B, H, P, 1]: one per piece; None: 1): the P affine maps S -> diag(d_p) S + E_p applied in
    order (reverse: from the last piece) from s0 (None: zeros), in float32; P is small, so the
    loop is unrolled into one XLA fusion."""
    P = E.shape[2]
    d = jnp.ones(E.shape[:3] + (1,), f32) if d is None else d
    S = jnp.zeros_like(E[:, :, 0]) if s0 is None else s0
    ins = [None] * P
    for p in (reversed(range(P)) if reverse else range(P)):
        ins[p] = S
        S = d[:, :, p, :, None] * S + E[:, :, p]
    return jnp.stack(ins, axis=2)


def walk_piece(P: int, L: int, reverse: bool):
    """(b, h, piece p, warpgroup w, chunk, ends) of a walk CTA on the grid (b, h, p) of P pieces
    of L chunks: chunk(step) the chunk piece p walks at `step` (from its last when `reverse`),
    ends whether p is the piece that walks last (the one that ends at the final state)."""
    b, h, p, w = (lax.axis_index(a) for a in ("b", "h", "p", "wg"))
    chunk = (lambda s: p * L + L - 1 - s) if reverse else (lambda s: p * L + s)
    return b, h, p, w, chunk, (p == 0) if reverse else (p == P - 1)


def enter_blocks(ops, src, kblk, fw, bar, sw, dt):
    """A walk's entering state as float32 [64, 64] register blocks, one per key block kr of kblk
    (a warpgroup's value columns): read from the GMEM view src(kr) through the float32 tile fw
    (src None: zeros) and, with a state tile sw (not None), also stored to it in dt."""
    S = []
    for kr in kblk:                               # the entering state, 64 rows at a time
        if src is not None:
            plgpu.copy_gmem_to_smem(src(kr), fw, bar)
            plgpu.barrier_wait(bar)
            blk = ops.acc(fw[...])
        else:
            blk = ops.zeros((LANES, LANES))
        S.append(blk)
        if sw is not None:
            sw[kr, :] = blk.astype(dt)
        if src is not None or sw is not None:
            plgpu.commit_smem()                   # also: fw is read before it is reused
    return S


def write_blocks(S, kblk, fw, dst):
    """A walk's float32 state blocks S[i] (key block kblk[i]) to the GMEM views dst(kr), 64 rows
    at a time through the float32 tile fw."""
    for i, kr in enumerate(kblk):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        fw[...] = S[i]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(fw, dst(kr))


def stage_state(S, sw, kblk, out=None):
    """The float32 state blocks S into the bf16 state tile sw (the next chunk's wgmma operand)
    and, with out = (value, tile, dst), value into the tile, sent to dst by TMA once committed."""
    if out is not None:
        value, tile, dst = out
        tile[...] = value.astype(tile.dtype)
    for i, kr in enumerate(kblk):
        sw[kr, :] = S[i].astype(sw.dtype)
    plgpu.commit_smem()
    if out is not None:
        plgpu.copy_smem_to_gmem(tile, dst)


def send_states(carry, kblk, fw, cell, send_ref, dp=None, *, out_mode: bool, final: bool, ends):
    """The end of a `decay.walk` / `gla.walk` consumer at cell (b, h, piece p, warpgroup w, value
    columns vc), its state blocks carry[:NKB] (NKB = len(kblk)): the output pass sends them to
    send_ref [B, H, K, V] where `final`, from the piece that walks last (`ends`); the state pass
    to send_ref [B, H, P, K, V] and, given dp = (dps, dp_ref), warpgroup 0 sends the piece's
    total decays carry[NKB:] (row vectors) through the float32 SMEM rows dps to dp_ref
    [B, H, P, ...]. Then every TMA store is awaited."""
    b, h, p, w, vc = cell
    if out_mode and final:
        pl.when(ends)(lambda: write_blocks(carry, kblk, fw, lambda kr: send_ref.at[b, h, kr, vc]))
    elif not out_mode:
        write_blocks(carry, kblk, fw, lambda kr: send_ref.at[b, h, p, kr, vc])
        if dp is not None:
            dps, dp_ref = dp

            @pl.when(w == 0)
            def _():
                for i, d in enumerate(carry[len(kblk):]):
                    dps[i] = d
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dps, dp_ref.at[b, h, p])
    plgpu.wait_smem_to_gmem(0)


def launch(body, cfg, ops, *, out_type, grid, grid_names, scratch, name, num_threads=1,
           no_auto_barriers=False):
    """The `plgpu.kernel` of `body` under the config's lowering semantics and exp, in the GPU
    interpreter where `ops` interprets; the warpgroup axis is named "wg". `no_auto_barriers`:
    Pallas puts no warpgroup barrier around the ref stores (`unsafe_no_auto_barriers`; the body
    must fence its cross-thread shared-memory accesses itself)."""
    return mosaic_gpu_kernel(
        body, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=num_threads,
        thread_name="wg", scratch_types=scratch, semantics=cfg.semantics,
        approx_math=cfg.approx_math, interpret=ops.interpret, name=name,
        profile_dir=cfg.profile_dir, no_auto_barriers=no_auto_barriers)


def walk_barriers(copies: int, consumers: int, stages: int):
    """A walk's barriers (in_bar, used_bar, own_bar): per ring slot one completed by its `copies`
    TMA copies and one released by every consumer warpgroup, and one per consumer for its own
    copies (the entering state)."""
    return [plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
            plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=consumers)]


def launch_walk(body, cfg, ops, *, out_type, scratch, cells, consumers, copies, stages, name,
                reverse=False, out=True, split=False):
    """The `launch` of a walk over cells (B, H, P pieces, NB column blocks) as `walk_piece` or
    `delta.walk_cell` reads them: grid (B, H, P NB) with one consumer warpgroup (split), else
    (B, H, P) with `consumers`; scratch, then the `walk_barriers` of a ring of `stages` slots
    filled by `copies` TMA copies each. The kernel is `name`, + "_rev" when `reverse`, + "_state"
    in a state pass (not `out`)."""
    B, H, P, NB = cells
    grid, gnames = ((B, H, P * NB), ("b", "h", "c")) if split else ((B, H, P), ("b", "h", "p"))
    name += ("_rev" if reverse else "") + ("" if out else "_state")
    return launch(body, cfg, ops, out_type=out_type, grid=grid, grid_names=gnames,
                  scratch=scratch + walk_barriers(copies, consumers, stages), name=name,
                  num_threads=consumers + 1)


def prod(a, b, acc=None, *, ta=False, tb=False):
    """One product for `Ops.mm`."""
    return (a, b, acc, ta, tb)


# -- inputs ---------------------------------------------------------------------------------------
def accepts(q, k, v, *rest) -> str | None:
    """Whether the Hopper kernels take these inputs (None) or why not: bf16 / fp16 only (the
    tensor cores' operands; float32 inputs are refused, not rounded: the registry's Triton kernel
    or the chunk form computes them exactly), K and V at most 128 (padded with zeros to 64 or
    128). The registry asks this before choosing the kernel."""
    dt = jnp.result_type(q, k, v)
    if dt not in (jnp.bfloat16, jnp.float16):
        return (f"the Mosaic GPU kernels take bfloat16 or float16 inputs, got {dt}; float32 runs "
                f"on impl='pallas:triton' or impl='chunk'")
    K, V = q.shape[-1], v.shape[-1]
    if K > 128 or V > 128:
        return (f"the Mosaic GPU kernels take K and V of at most 128, got K={K}, V={V}; use "
                f"impl='pallas:triton' or impl='chunk'")
    return None


def check_inputs(name: str, q, k, v):
    """`accepts` as a ValueError naming the op; returns (dtype, Kp, Vp)."""
    reason = accepts(q, k, v)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    dt = jnp.result_type(q, k, v)
    K, V = q.shape[-1], v.shape[-1]
    pad = lambda d: LANES if d <= LANES else 2 * LANES
    return dt, pad(K), pad(V)


def chunk_vjp(forward, backward):
    """The custom_vjp of a chunk kernel's core, with symbolic zeros: `forward(*inputs,
    residuals) -> ((o, S), residuals)` (an input may be None: it has no cotangent) and
    `backward(res, do, dS) -> cotangents`, where an unused o arrives as zeros of o's type and an
    unused final state S as None (else float32), so the reverse walk skips what is not needed."""

    def fwd(*primals):                                    # symbolic zeros: wrapped primals
        return forward(*[None if x is None else x.value for x in primals], residuals=True)

    def bwd(res, cts):
        do, dS = cts
        do = jnp.zeros(do.aval.shape, do.aval.dtype) if isinstance(do, SymbolicZero) else do
        dS = None if isinstance(dS, SymbolicZero) else dS.astype(jnp.float32)
        return backward(res, do, dS)

    f = jax.custom_vjp(lambda *a: forward(*a, residuals=False)[0])
    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def padded_inputs(name: str, q, k, v, initial_state, C: int):
    """What each chunk kernel's op entry does first: `check_inputs`, then q, k, v padded to Tp
    (T rounded up to the chunk C) rows and Kp / Vp columns, and the initial state to [Kp, Vp]
    in float32 (None stays None). Returns (Tp, Kp, (q, k, v), h0)."""
    dt, Kp, Vp = check_inputs(name, q, k, v)
    Tp = -(-q.shape[1] // C) * C
    K, V = q.shape[-1], v.shape[-1]
    h0 = None if initial_state is None else jnp.pad(
        initial_state.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    return Tp, Kp, (pad_input(q, Tp, Kp, dt), pad_input(k, Tp, Kp, dt),
                    pad_input(v, Tp, Vp, dt)), h0


def unpadded(o, S, q, v):
    """The kernel's (o, S) cut back to the op's T, K, V: o in v's dtype, S float32."""
    T, K, V = q.shape[1], q.shape[-1], v.shape[-1]
    if o.shape[1] != T or o.shape[-1] != V:
        o = o[:, :T, :, :V]
    return o.astype(v.dtype), (S if S.shape[-2:] == (K, V) else S[:, :, :K, :V])


def pad_input(x, Tp: int, X: int, dt):
    """[B, T, H, *] in dtype dt, zero-padded to Tp rows and X columns (zeros are neutral)."""
    x = pad_time(x.astype(dt), Tp)
    if X == x.shape[-1]:
        return x
    return jnp.pad(x, ((0, 0),) * 3 + ((0, X - x.shape[-1]),))


def gate_rows(g, doc, *, scale: float, C: int, H: int):
    """The per-token float32 rows every scalar-gate kernel reads, [B, H, R, Tp], and their names.

    With G the chunk-local inclusive cumulative gate and the packed-document masks of
    `chunking.doc_masks` (in: the row still reads the entering state; out: the row is in the
    chunk's last document; keep: no reset inside the chunk):
        gq  = scale exp(G_i) in_i              factor of q_i's read of the entering state
        gk  = exp(G_last - G_j) out_j          factor of k_j v_j's write into the leaving state
        dec = keep exp(G_last)                 the chunk's decay of the state (same on every row)
        G   (gated only)                       for the intra-chunk decay exp(G_i - G_j), i >= j
        doc (segment ids only)                 the document index, as float32 (exact below 2^24)
    g: None or [B, Tp, H] float32 log decays; doc: None or [B, Tp] int32 (`padded_doc`). The
    exponent of gk is formed as a span sum (no difference of cumulative sums). Returns (rows, or
    None when there is neither gate nor document, and the row names)."""
    names = row_names(g is not None, doc is not None)
    if g is None and doc is None:
        return None, names
    B, Tp = (g if g is not None else doc).shape[:2]
    N = Tp // C
    if g is None:
        gc = jnp.zeros((B, 1, N, C), f32)
    else:
        gc = jnp.moveaxis(g.astype(f32), 2, 1).reshape(B, g.shape[2], N, C)
    G = jnp.cumsum(gc, axis=-1)
    after = rev_cumsum_excl(gc, axis=-1)                            # sum_{s > j} g_s in the chunk
    gq = scale * jnp.exp(G)
    gk = jnp.exp(after)
    dec = jnp.broadcast_to(jnp.exp(G[..., -1:]), G.shape)
    rows = {"gq": gq, "gk": gk, "dec": dec, "G": G}
    if doc is not None:
        doc = doc.reshape(B, N, C)
        d_in = jnp.concatenate([jnp.zeros_like(doc[:, :1, 0]), doc[:, :-1, -1]], axis=1)
        in_rows = (doc == d_in[..., None])[:, None]
        out_rows = (doc == doc[..., -1:])[:, None]
        keep = (doc[..., -1] == d_in)[:, None, :, None]
        rows["gq"] = jnp.where(in_rows, gq, 0.0)
        rows["gk"] = jnp.where(out_rows, gk, 0.0)
        rows["dec"] = jnp.where(keep, dec, 0.0)
        rows["doc"] = jnp.broadcast_to(doc[:, None].astype(f32), G.shape)
    out = jnp.stack([jnp.broadcast_to(rows[n], (B, H, N, C)) for n in names], axis=2)
    return out.reshape(B, H, len(names), Tp), names


def raw_gate_rows(g, doc, *, C: int, H: int):
    """The raw per-token rows from which the kernels form their gate factors themselves
    (`HopperChunkConfig.gates == "kernel"`, see `ChunkGates`), [B, H, R, Tp] float32, and names:
        g     (gated only)       the token's log decay
        doc   (segment ids only) the document index, as float32 (exact below 2^24)
        din   (segment ids only) the document of the token before the chunk (0 for chunk 0)
    g: None or [B, Tp, H] float32; doc: None or [B, Tp] int32 (`padded_doc`). One XLA fusion (g's
    transpose to head-major; no cumulative sums: the kernels form those per chunk). Returns (rows,
    or None when there is neither gate nor document, and the row names)."""
    names = (("g",) if g is not None else ()) + (("doc", "din") if doc is not None else ())
    if not names:
        return None, names
    rows = []
    if g is not None:
        rows.append(jnp.moveaxis(g.astype(f32), 2, 1))
    if doc is not None:
        B, Tp = doc.shape
        d = doc.reshape(B, Tp // C, C)
        din = jnp.concatenate([jnp.zeros_like(d[:, :1, :1]), d[:, :-1, -1:]], axis=1)
        for x in (d, jnp.broadcast_to(din, d.shape)):
            rows.append(jnp.broadcast_to(x.reshape(B, 1, Tp).astype(f32), (B, H, Tp)))
    return jnp.stack(rows, axis=2), names


class ChunkGates:
    """A chunk's gate factors inside a compute warpgroup, as vectors over the chunk's rows:

        gq    scale exp(G_i) in_i         (None: no gate and no documents; the factor is `scale`)
        gk    exp(G_last - G_j) out_j     (None: the factor is 1)
        dec   keep exp(G_last), the same on every row (None: 1)
        E(reverse)  the [C, C] masked, decayed intra factor scale exp(G_i - G_j) (see `gate_rows`)

    From `ref` [R, C], the chunk's rows in SMEM: `raw` the rows of `raw_gate_rows` (the chunk-local
    sums are formed here as masked row sums of a [C, C] broadcast of g: the inclusive prefix G,
    the exclusive suffix for gk (a span sum, no difference), the total for dec), else the rows of
    `gate_rows` (named `names`) loaded as they are. ref None: no rows. tmp: a float32 [C] SMEM row
    of the calling warpgroup, through which raw G reaches the column layout. Nothing here sums
    over axis 0 of a tile, so several warpgroups may form their ChunkGates at once."""

    def __init__(self, ops, ref, names, C: int, *, scale: float, raw: bool, tmp=None):
        self.ops, self.scale, self.shape = ops, scale, (C, C)
        self.r, self.c = ops.iota(self.shape, 0), ops.iota(self.shape, 1)
        self.gq = self.gk = self.dec = self.G = self.doc = None
        if ref is None:
            return
        rows_of, cols_of, shape, r, c = ops.rows_of, ops.cols_of, self.shape, self.r, self.c
        at = lambda name: ref.at[names.index(name)]
        if not raw:
            self.gq, self.gk, self.dec = (ops.row(at(n)[...]) for n in ("gq", "gk", "dec"))
            if "G" in names:
                self.G = (rows_of(ops.row(at("G")[...]), shape),
                          cols_of(ops.col(at("G")[...]), shape))
            if "doc" in names:
                self.doc = (rows_of(ops.row(at("doc")[...]), shape),
                            cols_of(ops.col(at("doc")[...]), shape))
            return
        one = ops.row(jnp.ones((C,), f32))
        gq, gk, dec = scale * one, one, one
        if "g" in names:
            g_c = cols_of(ops.col(at("g")[...]), shape)                 # [r, c] = g_c
            G = jnp.sum(jnp.where(c <= r, g_c, 0.0), axis=1)            # sum_{s <= i} g_s
            after = jnp.sum(jnp.where(c > r, g_c, 0.0), axis=1)         # sum_{s > j} g_s
            total = jnp.sum(g_c, axis=1)
            # G over the columns through this warpgroup's own SMEM row, not a sum over axis 0:
            # a cross-warp reduction uses the one reduction scratch of the whole CTA, so two
            # compute warpgroups reducing at once race on it (on the H200: o and dv wrong at
            # K = V = 128, two warpgroups, right at 64).
            tmp[...] = G
            plgpu.commit_smem()
            self.G = (rows_of(G, shape), cols_of(ops.col(tmp[...]), shape))
            gq, gk, dec = scale * jnp.exp(G), jnp.exp(after), jnp.exp(total)
        if "doc" in names:
            d_row, d_col = ops.row(at("doc")[...]), ops.col(at("doc")[...])
            d_in = ops.row(at("din")[...])
            last = jnp.sum(jnp.where(c == C - 1, cols_of(d_col, shape), 0.0), axis=1)
            self.doc = (rows_of(d_row, shape), cols_of(d_col, shape))
            gq = jnp.where(d_row == d_in, gq, 0.0)          # still reads the entering state
            gk = jnp.where(d_row == last, gk, 0.0)          # in the chunk's last document
            dec = jnp.where(last == d_in, dec, 0.0)         # no reset inside the chunk
        self.gq, self.gk, self.dec = gq, gk, dec

    def factor(self, name: str):
        """"gq" or "gk" as a row vector, or its constant when there are no rows."""
        v = getattr(self, name)
        return v if v is not None else (self.scale if name == "gq" else 1.0)

    def E(self, *, reverse: bool):
        """[C, C]: rows are queries (forward) or keys (`reverse`)."""
        r, c = self.r, self.c
        mask = (c >= r) if reverse else (r >= c)
        if self.doc is not None:
            mask = mask & (self.doc[0] == self.doc[1])
        if self.G is None:
            return jnp.where(mask, jnp.full(self.shape, self.scale, f32), 0.0)
        Gr, Gc = self.G
        span = (Gc - Gr) if reverse else (Gr - Gc)          # sum of the gates in (j, i]: <= 0
        return jnp.where(mask, self.scale * jnp.exp(jnp.minimum(span, 0.0)), 0.0)


def row_names(gated: bool, has_doc: bool):
    return ("gq", "gk", "dec") + (("G",) if gated else ()) + (("doc",) if has_doc else ())


def padded_doc(segment_ids, Tp: int):
    """The document index [B, Tp] int32, padding continuing the last document."""
    return pad_time(doc_index(segment_ids), Tp, mode="edge").astype(jnp.int32)


# -- added for the delta-rule kernels -------------------------------------------------------------
def term(a, b, *, ta=False, tb=False):
    """One product a @ b of an `mm_sum` group (operands as `Ops.mm`)."""
    return (a, b, ta, tb)


def mm_sum(ops, *groups):
    """Float32 results of several accumulations issued together, then awaited once.

    Each group is (acc, terms): acc None (start from zero) or a float32 [M, N] array, terms a
    list of `term`s whose products all add onto that accumulator (one wgmma each, the same
    accumulator registers), so a sum of products costs no register add and no extra wait."""
    if ops.interpret:
        outs = []
        for acc, terms in groups:
            r = acc
            for a, b, ta, tb in terms:
                d = jnp.dot(ops._value(a, ta), ops._value(b, tb), preferred_element_type=f32)
                r = d if r is None else r + d
            outs.append(r)
        return outs
    inits = []
    for acc, terms in groups:
        a, b, ta, tb = terms[0]
        m = a.shape[1] if ta else a.shape[0]
        n = b.shape[0] if tb else b.shape[1]
        inits.append(plgpu.ACC.init(ops.zeros((m, n)) if acc is None else acc))

    def body(refs):
        for ref, (_, terms) in zip(refs, groups, strict=True):
            for a, b, ta, tb in terms:
                plgpu.wgmma(ref, plgpu.transpose_ref(a, (1, 0)) if ta else a,
                            plgpu.transpose_ref(b, (1, 0)) if tb else b)

    return list(pl.run_state(body)(tuple(inits)))


def split_hi_lo(x, dt):
    """x (float32) as hi + lo in dt: ~16 mantissa bits from two 16-bit operands. Inside a kernel
    body only (the Mosaic GPU lowering keeps both casts); outside, `split_hi_lo_xla`."""
    hi = x.astype(dt)
    return hi, (x - hi.astype(f32)).astype(dt)


def split_hi_lo_xla(x, dt):
    """`split_hi_lo` in the XLA program around the kernels. XLA's GPU compiler, which allows
    excess precision by default, rewrites convert(convert(x, bf16), f32) to x, so the cast round
    trip made lo zero on the device: gla's gates then carried 8 mantissa bits, and its gate
    gradient and dh0 were 2e-2 off at strong decay while the CPU interpreter passed. The
    rounding is done by `lax.reduce_precision`, which XLA keeps; hi is then exact in dt."""
    info = jnp.finfo(dt)
    hi = lax.reduce_precision(x.astype(f32), exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return hi.astype(dt), (x - hi).astype(dt)
