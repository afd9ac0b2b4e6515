"""The UT (WY) transform of the delta-rule family, one chunk per program, as Pallas kernels.

Inside a chunk (D the gate spans, same / in_rows the document masks, see
`linear_jax.ops.common.delta_chunk`):

    L = strictly_lower(diag(beta) (K K^T * exp(D)) * same),   T = (I + L)^{-1}
    W = T diag(beta) (K * exp(Gin) * in_rows),                U = T diag(beta) V

With KDA's vector gate exp(D) does not factor out of the key sum: K K^T * exp(D) is then the
decay family's intra matrix of the keys with themselves (`intra.intra_forward(k, k)`), formed by
the caller and read here as Akk; Gin is per channel.

T is `tiles.unit_lower_inverse` (recursive doubling: 2 log2(C) [C, C] products, the same algorithm
as the TPU kernel and the XLA form), on the tensor cores at float32 accuracy (3xTF32) for float32
inputs and in tf32 for bf16 / fp16 inputs, whose rounding (2^-11) stays below the inputs' own.
Against the earlier sub-chunk substitution (16 row steps of one [C, C] product each, then the
block-lower part by a nilpotent product: about 20 [C, C] products at C = 64) this takes 12.
Two kernels, both over grid (B*H, N): `delta_ut_inverse` forms T, `delta_ut_apply` reads it back
as one [C, C] tile for W and U (the two-pass forward; the one-pass forward of `fused.py` applies
T itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.chunk_state import gate_rows
from linear_jax.kernels.gpu.common import F32, Chunk
from linear_jax.kernels.gpu.triton import dot, interpret


def ut_transform(ctx, k, v, beta, g, G, doc, Akk=None):
    """k [B,Tp,H,Kp], v [B,Tp,H,Vp], beta [B,Tp,H] float32, g [B,Tp,H(,Kp)] float32 and its
    prefix sums G (any arrays without a gate), doc [B,Tp] int32, Akk [B,Tp,H,C] (vector gate
    only). Returns W [B,Tp,H,Kp] (`common.half_dtype`), and U [B,Tp,H,Vp] and T [B,Tp,H,C] (kept
    for the backward) in float32."""
    Tm = inverse(ctx, k, beta, g, doc, Akk)
    W, U = _apply(ctx, k, v, beta, G, doc, Tm)
    return W, U, Tm


def gated_L(ctx, ch, k, beta, g, G=None):
    """(L [C, C], the decay exp(D) on causal same-document pairs, e_in [C, 1]) of a chunk, from its
    keys k [C, Kp], beta [C], gates g [C] (None: no gate) and their exact prefix sums G [C] (with
    `spans="scan"`, e_in is None without G: the inverse does not use it)."""
    decay, e_in, _, _ = ch.exact(g, G, None, None)
    L = ctx.dot(k, k, tb=True) * beta[:, None] * decay
    return jnp.where(ch.row > ch.col, L, 0.0), decay, e_in


def inverse(ctx, k, beta, g, doc, Akk=None):
    """T = (I + L)^{-1} of every chunk, [B, Tp, H, C] float32; L from the keys and the scalar gate
    g, or from Akk (vector gate: g unused)."""
    B, Tp, H, Kp = k.shape
    C = ctx.C
    # float32 inputs: float32-accurate products (3xTF32); bf16/fp16 inputs: tf32
    mm = lambda a, b: dot(a, b, split_tf32=ctx.f32, interpret=interpret(ctx.cfg))

    def kernel(k_ref, b_ref, g_ref, doc_ref, t_ref):
        ch = Chunk(ctx, pl.program_id(1), doc_ref)
        if vec:  # no boolean tile on the way to the products (tiles.unit_lower_inverse)
            L = g_ref[...] * b_ref[...][:, None] * tiles.strictly_lower(ch.row, ch.col)
        else:
            L, _, _ = gated_L(ctx, ch, k_ref[...], b_ref[...],
                              g_ref[...] if ctx.kind == "scalar" else None)
        t_ref[...] = tiles.unit_lower_inverse(L, ch.row, ch.col, mm, float_masks=vec)

    rows = lambda X: common.spec(H, C, X, t=0)
    vec = ctx.kind == "vector"
    return ctx.call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), common.spec(H, C, t=0), rows(C) if vec else common.spec(H, C, t=0),
                  common.doc_spec(H, Tp)],
        out_specs=rows(C), out_shape=jax.ShapeDtypeStruct((B, Tp, H, C), F32),
        warps=ctx.cfg.warps_out, stages=1, name="delta_ut_inverse",
    )(k, beta, Akk if vec else g, doc)


def _apply(ctx, k, v, beta, G, doc, Tm):
    B, Tp, H, Kp = k.shape
    Vp, C = v.shape[-1], ctx.C
    BV = common.value_block(Vp, ctx.cfg.block_v_out)

    def kernel(k_ref, v_ref, b_ref, g_ref, doc_ref, t_ref, w_ref, u_ref):
        ch = Chunk(ctx, pl.program_id(1), doc_ref)
        _, e_in, _, _ = gate_rows(ctx, ch, g_ref, 0)
        Tm, beta = t_ref[...], b_ref[...][:, None]
        w_ref[...] = ctx.dot(Tm, k_ref[...].astype(F32) * (beta * e_in)).astype(w_ref.dtype)
        for vb in range(Vp // BV):
            cols = pl.ds(vb * BV, BV)
            u_ref[:, cols] = ctx.dot(Tm, v_ref[:, cols].astype(F32) * beta)

    rows = lambda X: common.spec(H, C, X, t=0)
    return ctx.call(
        kernel, grid=(B * H, Tp // C),
        in_specs=[rows(Kp), rows(Vp), common.spec(H, C, t=0),
                  rows(Kp) if ctx.kind == "vector" else common.spec(H, C, t=0),
                  common.doc_spec(H, Tp), rows(C)],
        out_specs=[rows(Kp), rows(Vp)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Kp), common.half_dtype(k.dtype)),
                   jax.ShapeDtypeStruct((B, Tp, H, Vp), F32)],
        warps=ctx.cfg.warps_out, stages=ctx.cfg.stages_out, name="delta_ut_apply",
    )(k, v, beta, G, doc, Tm)
