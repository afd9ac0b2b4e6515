"""pallas_call plumbing, chunk-to-chunk state carry and custom_vjp shared by the TPU kernels of the
decay family (simple GLA, GLA), of the delta rule (with its per-token `beta`) and of mLSTM (with
its input gate and stabiliser rows).

A kernel module gives the bodies of one chunk; this module lays the inputs out (`_layout`), builds
the grid (B, H, N) with batch and heads "parallel" and the chunks "arbitrary" (sequential, the
[K, V] float32 state carried in VMEM scratch), carries the state from chunk to chunk, and wires the
custom_vjp: the forward pass under autodiff also writes every chunk's entering state (the backward
needs S_in per chunk; recomputing it would take a second sweep), and the backward sweeps the chunks
in reverse (index map n -> N-1-n) carrying dS = dL/dS_out.

The bodies see one chunk, its input refs as `Chunk` (`scalars` the op's per-token tables after
the gate, docs None where the op has none):
  forward:  fwd(chunk, o_ref, S_in, extra, **static) -> S_out            (writes o)
  backward: bwd(chunk, S_in, do, dS, outs, extra, **static) -> dS_in     (writes dq, dk, dv,
            dgate and a gradient per scalar table through outs)
with `extra` the kernel's own VMEM scratch and static = (C, scale, mode, cfg). Vector gates come as
[C, K_pad] blocks. Per-token scalars (a scalar gate, the scalar tables, the relative document
index) come as
[N, C] tables resident in VMEM for a whole (b, h) and read one row per chunk
(`_layout.table_row`): a [T, 1] array would be padded to 128 lanes in HBM and cost as much
bandwidth as q. Their gradients leave the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import _layout, mosaic
from linear_jax.kernels.tpu.mosaic import F32

_SQ = mosaic.SQUEEZED


@dataclasses.dataclass(frozen=True)
class KernelDef:
    """One op's chunk bodies. `scratch(C, K_pad, V_pad, cfg)` lists extra VMEM scratch;
    `scalars` counts the per-token tables after the gate (the delta rule's beta; mLSTM's i, m,
    m_prev); `f32_out` writes o in float32 (mLSTM normalises it afterwards)."""

    name: str
    vector_gate: bool
    fwd: Callable
    bwd: Callable
    scalars: int = 0
    f32_out: bool = False
    fwd_scratch: Callable = lambda C, Kp, Vp, cfg: []
    bwd_scratch: Callable = lambda C, Kp, Vp, cfg: []


class Chunk:
    """This grid step's chunk: its index, iotas, document masks and input refs."""

    def __init__(self, refs, kdef, docs, C, reverse):
        it = iter(refs)
        self.q, self.k, self.v, self.g = (next(it) for _ in range(4))
        self.scalars = [next(it) for _ in range(kdef.scalars)]
        self.docs = next(it) if docs else None
        self.rest = list(it)
        self.idx = _layout.chunk_index(reverse)
        self.row, self.col = tiles.iotas(C)
        self.masks = _layout.doc_masks_at(self.docs, self.idx, self.row, self.col)

    def table(self, ref):
        """This chunk's row of a per-token table as (column [C, 1], row [1, C])."""
        return _layout.table_row(ref, self.idx, self.row, self.col)

    def store(self, ref, column):
        _layout.store_row(ref, self.idx, column, self.row, self.col)


@dataclasses.dataclass(frozen=True)
class _Static:
    kdef: KernelDef
    C: int
    scale: float
    mode: str             # "exact" (float32 operands) or "fast" (bf16 operands)
    cfg: TpuConfig

    def body_kw(self):
        return dict(C=self.C, scale=self.scale, mode=self.mode, cfg=self.cfg)


def _fwd_kernel(*refs, s, docs, save):
    ch = Chunk(refs, s.kdef, docs, s.C, reverse=False)
    s0_ref, o_ref, sT_ref, *rest = ch.rest
    sc_ref = rest.pop(0) if save else None
    S_ref, *extra = rest
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        S_ref[...] = s0_ref[...]

    S_in = S_ref[...]
    if save:
        sc_ref[...] = S_in
    S_ref[...] = s.kdef.fwd(ch, o_ref, S_in, extra, **s.body_kw())

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sT_ref[...] = S_ref[...]


def _bwd_kernel(*refs, s, docs):
    ch = Chunk(refs, s.kdef, docs, s.C, reverse=True)
    sc_ref, do_ref, dsT_ref, *rest = ch.rest
    n_out = 5 + s.kdef.scalars
    outs, ds0_ref, dS_ref, extra = rest[:n_out - 1], rest[n_out - 1], rest[n_out], rest[n_out + 1:]
    m = pl.program_id(2)

    @pl.when(m == 0)
    def _():
        dS_ref[...] = dsT_ref[...]

    dS_ref[...] = s.kdef.bwd(ch, sc_ref[...], do_ref[...], dS_ref[...], outs, extra,
                             **s.body_kw())

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dS_ref[...]


def _table(x, C):
    """[..., T_pad] -> [..., N, C]."""
    return x.reshape(x.shape[:-1] + (x.shape[-1] // C, C))


def _in_specs(s, N, Kp, Vp, docs, reverse):
    C = s.C
    c = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    tok = lambda D: pl.BlockSpec((_SQ, _SQ, C, D), lambda b, h, n: (b, h, c(n), 0))
    specs = [tok(Kp), tok(Kp), tok(Vp)]
    table = pl.BlockSpec((_SQ, _SQ, N, C), lambda b, h, n: (b, h, 0, 0))
    specs.append(tok(Kp) if s.kdef.vector_gate else table)
    specs += [table] * s.kdef.scalars
    if docs:
        specs.append(pl.BlockSpec((_SQ, N, C), lambda b, h, n: (b, 0, 0)))
    state = pl.BlockSpec((_SQ, _SQ, Kp, Vp), lambda b, h, n: (b, h, 0, 0))
    chunk_state = pl.BlockSpec((_SQ, _SQ, _SQ, Kp, Vp), lambda b, h, n: (b, h, c(n), 0, 0))
    return specs, tok, table, state, chunk_state


def _call(s, kernel, name, grid, in_specs, out_specs, out_shape, scratch):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, name=name,
        compiler_params=mosaic.compiler_params(s.cfg, ("parallel", "parallel", "arbitrary")),
        interpret=mosaic.interpret(s.cfg))


def _args(s, g, scalars, docs):
    return ([g if s.kdef.vector_gate else _table(g, s.C)] + [_table(x, s.C) for x in scalars]
            + ([docs] if docs is not None else []))


def _out_dtype(s, v):
    return F32 if s.kdef.f32_out else v.dtype


def _forward(s, q, k, v, g, scalars, docs, s0, save):
    B, H, Tp, Kp = q.shape
    Vp, N = v.shape[-1], Tp // s.C
    specs, tok, _, state, chunk_state = _in_specs(s, N, Kp, Vp, docs is not None, reverse=False)
    out_shape = [jax.ShapeDtypeStruct((B, H, Tp, Vp), _out_dtype(s, v)),
                 jax.ShapeDtypeStruct((B, H, Kp, Vp), F32)]
    out_specs = [tok(Vp), state]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, Kp, Vp), F32))
        out_specs.append(chunk_state)
    kernel = functools.partial(_fwd_kernel, s=s, docs=docs is not None, save=save)
    scratch = [mosaic.vmem((Kp, Vp))] + s.kdef.fwd_scratch(s.C, Kp, Vp, s.cfg)
    args = [q, k, v, *_args(s, g, scalars, docs), s0]
    return _call(s, kernel, f"{s.kdef.name}_fwd", (B, H, N), specs + [state], out_specs,
                 out_shape, scratch)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(s, q, k, v, g, scalars, docs, s0):
    o, sT = _forward(s, q, k, v, g, scalars, docs, s0, save=False)
    return o, sT


def _core_fwd(s, q, k, v, g, scalars, docs, s0):
    o, sT, sc = _forward(s, q, k, v, g, scalars, docs, s0, save=True)
    return (o, sT), (q, k, v, g, scalars, docs, sc)


def _core_bwd(s, res, cts):
    q, k, v, g, scalars, docs, sc = res
    do, dsT = cts
    B, H, Tp, Kp = q.shape
    Vp, N = v.shape[-1], Tp // s.C
    specs, tok, table, state, chunk_state = _in_specs(s, N, Kp, Vp, docs is not None,
                                                      reverse=True)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    out_specs = [tok(Kp), tok(Kp), tok(Vp)]
    table_shape = jax.ShapeDtypeStruct((B, H, N, s.C), F32)
    out_shape.append(jax.ShapeDtypeStruct(g.shape, F32) if s.kdef.vector_gate else table_shape)
    out_specs.append(tok(Kp) if s.kdef.vector_gate else table)
    out_shape += [table_shape] * s.kdef.scalars
    out_specs += [table] * s.kdef.scalars
    out_shape.append(jax.ShapeDtypeStruct((B, H, Kp, Vp), F32))
    out_specs.append(state)
    kernel = functools.partial(_bwd_kernel, s=s, docs=docs is not None)
    scratch = [mosaic.vmem((Kp, Vp))] + s.kdef.bwd_scratch(s.C, Kp, Vp, s.cfg)
    args = [q, k, v, *_args(s, g, scalars, docs), sc, do.astype(_out_dtype(s, v)),
            dsT.astype(F32)]
    dq, dk, dv, dg, *dsc, ds0 = _call(
        s, kernel, f"{s.kdef.name}_bwd", (B, H, N), specs + [chunk_state, tok(Vp), state],
        out_specs, out_shape, scratch)(*args)
    dsc = tuple(d.reshape(x.shape) for d, x in zip(dsc, scalars, strict=True))
    return dq, dk, dv, dg.reshape(g.shape), dsc, None, ds0


_core.defvjp(_core_fwd, _core_bwd)


def run(kdef: KernelDef, q, k, v, g, *, scale, initial_state, segment_ids, chunk_size,
        config: TpuConfig | None, scalars=()):
    """The op-level entry: [B, T, H, D] inputs (heads expanded), `scalars` the kernel's per-token
    tables [B, T, H] -> (o in v's dtype, or float32 with `f32_out`; S float32). config: the
    registry always passes one; None takes `TpuConfig.default()`."""
    config = config or TpuConfig.default()
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    C = config.chunk_for(chunk_size, jnp.dtype(dtype).itemsize)
    Tp = _layout.round_up(T, C)
    Kp, Vp = _layout.round_up(K, config.lane), _layout.round_up(V, config.lane)
    s = _Static(kdef, C, float(scale), "fast" if dtype == jnp.bfloat16 else "exact", config)
    qh, kh = (_layout.heads_major(x.astype(dtype), Tp, Kp) for x in (q, k))
    vh = _layout.heads_major(v.astype(dtype), Tp, Vp)
    if kdef.vector_gate:
        gh = _layout.heads_major(g.astype(F32), Tp, Kp)                   # [B, H, T_pad, K_pad]
    else:
        g = jnp.zeros((B, T, H), F32) if g is None else g.astype(F32)
        gh = jnp.swapaxes(_layout.pad_time(g, Tp), 1, 2)                   # [B, H, T_pad]
    sh = tuple(jnp.swapaxes(_layout.pad_time(x.astype(F32), Tp), 1, 2) for x in scalars)
    docs = None if segment_ids is None else _layout.doc_table(segment_ids, T, C)
    s0 = _layout.pad_state(initial_state, B, H, Kp, Vp)
    o, S = _core(s, qh, kh, vh, gh, sh, docs, s0)
    return _layout.from_heads_major(o, T, V).astype(_out_dtype(s, v)), S[:, :, :K, :V]
