"""The sequential chunk-state pass, written once for the decay family, the delta rule and mLSTM.

`sequential` is the walk itself: one program per (batch * head, state tile) carries float32 state
tiles through the N chunks in order (or in reverse), and a step function says what one chunk does.
`state_pass` gives the decay family's and the delta rule's steps, which are one recurrence (a, the
gate factors e_in / e_out and the masks as `common.Chunk`; q already scaled by `scale`):

    forward, n = 0 .. N-1, S_0 = the initial state:
        y_n     = v_n                                   (decay family)
        y_n     = U_n - W_n S_n                         (delta rule: u, written out)
        S_{n+1} = a_n S_n + (k_n * e_out_n)^T y_n
    reverse, n = N-1 .. 0, dS_N = the final state's cotangent:
        dS_n    = a_n dS_{n+1} + (scale q_n * e_in_n)^T do_n
        du_n    = A_n^T do_n + (k_n * e_out_n) dS_{n+1}  (delta rule, written out; A the intra
        dS_n   -= W_n^T du_n                             matrix, q k^T * exp(D) on causal pairs,
                                                         read from A for KDA's vector gate)

so the delta rule's pass is the decay pass with y = U - W S (its reverse adds the W term). Each
exponent is a span sum of gates, <= 0. The pass writes the state on
one side of every chunk (forward: S_n, entering; reverse: dS_{n+1}, leaving) and the end state.
The factors come from the gates' prefix sums (values only: `common` says why the sequential
passes do not form the spans themselves).
Grid: (B*H, K/BK, V/BV) for the decay family; the delta rule keeps all of K in a program (u needs
W S over K), (B*H, V/BV). mLSTM's pass (`mlstm.py`) runs its own step on `sequential`, with its
normaliser n as a second carry. The one-pass forward (`fused.py`) also walks on it.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl

from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.common import F32, Chunk


def row_stages(stages: int, Kp: int, split: bool = False) -> int:
    """Pipeline stages for a pass that loads whole [C, Kp] rows (the delta state passes' k, W and
    q; every one-pass forward's q and k, and W in the delta rule's): 1 past Kp = 128, else `stages`.

    Triton's pipelining (stages > 1) keeps each loop load's buffer twice in shared memory. Compiled
    for sm_90 from a CPU (`experiments/benchmarks/kernel_smem.py`, Triton 3.9, K = V = 256,
    float32), with 2 stages Gated DeltaNet's reverse state pass asked 272,148 B at B 2 H 4 (280,596
    B on an H100, session 26), its one-pass forward 239,892 B and gla's 284,420 B at T 128, B 1
    H 1, where the H100 gives a block 232,448; with 1 stage, 139,264, 131,080 and 86,016 B.
    simple_gla's one-pass forward, 218,900 B with 2 stages (131,080 with 1), was under by less
    than the device's Triton adds (8,448 B more on the H100 than here in session 26).

    `split` (float32 products as 3xTF32, `TritonChunkConfig.f32_dots="tf32x3"`): 1 from Kp = 128.
    On an H100 Gated DeltaNet's fwd + bwd at B 8, H 16, K = V = 128 under 3xTF32 asked 246,788 B
    (session 35; IEEE passed there); here its reverse state pass asks 280,340 B with 2 stages and
    its one-pass forward 264,468 (149,268 and 166,164 under IEEE)."""
    return 1 if Kp > 128 or (split and Kp >= 128) else stages


def sequential(ctx, step, *, ins, carry, outs, grid, N, reverse, warps, stages, name):
    """Walks the chunks in order (reverse: backwards) with `step(n, carry, in_refs, out_refs, pids)
    -> carry` over float32 state tiles (pids: the program ids, read outside the loop, where
    interpret mode can discharge them). ins, outs: lists of (array or ShapeDtypeStruct, BlockSpec);
    carry: the initial carries (array, spec); the final carries are written as the last outputs
    (float32, with the carries' specs). Returns the outputs."""
    n_in, n_c = len(ins), len(carry)

    def kernel(*refs):
        in_refs, c_refs = refs[:n_in], refs[n_in:n_in + n_c]
        out_refs, end_refs = refs[n_in + n_c:len(refs) - n_c], refs[len(refs) - n_c:]

        pids = [pl.program_id(i) for i in range(len(grid))]

        def body(it, c):
            return step(N - 1 - it if reverse else it, c, in_refs, out_refs, pids)

        final = jax.lax.fori_loop(0, N, body, tuple(r[...].astype(F32) for r in c_refs))
        for ref, c in zip(end_refs, final, strict=True):
            ref[...] = c

    arrays = [a for a, _ in ins] + [a for a, _ in carry]
    return ctx.call(
        kernel, grid=grid, in_specs=[s for _, s in ins] + [s for _, s in carry],
        out_specs=[s for _, s in outs] + [s for _, s in carry],
        out_shape=[o for o, _ in outs] + [jax.ShapeDtypeStruct(a.shape, F32) for a, _ in carry],
        warps=warps, stages=stages, name=name)(*arrays)


def gate_rows(ctx, ch, G_ref, first, pairs=False):
    """(decay [C, C] or None, e_in, e_out, a) of the chunk of rows first .. first + C - 1 of G_ref,
    the gates' prefix sums (`common.Chunk.prefix`; any array without a gate); a vector gate's a is
    a column [X, 1] (it scales state rows)."""
    C = ctx.C
    if ctx.kind == "vector":
        return ch.prefix(G_ref[pl.ds(first, C), :], G_ref[pl.ds(first + C - 1, 1), :])
    if ctx.kind == "scalar":
        return ch.prefix(G_ref[pl.ds(first, C)], G_ref[first + C - 1], pairs)
    return ch.scalar(None, pairs)


def _step(ctx, *, reverse, delta, scale):
    C = ctx.C

    def step(n, carry, ins, outs, pids):
        (S,) = carry
        x_ref, y_ref, g_ref, doc_ref = ins[:4]
        outs[0][n] = S.astype(outs[0].dtype)
        rows = pl.ds(n * C, C)
        ch = Chunk(ctx, n, doc_ref)
        decay, e_in, e_out, a = gate_rows(ctx, ch, g_ref, n * C, pairs=delta and reverse)
        x, y = x_ref[rows, :], y_ref[rows, :]
        xw = x.astype(F32) * (scale * e_in if reverse else e_out)
        if not delta:
            # bf16/fp16 operands, float32 accumulation: the gated rows are <= |x| in size
            return (a * S + ctx.dot(xw.astype(y.dtype), y, ta=True),)
        k_ref, w_ref = ins[4:6]
        W = w_ref[rows, :].astype(F32)
        if not reverse:                                   # x = k, y = U: u and keys in float32
            u = y - ctx.dot(W, S)
            outs[1][rows, :] = u.astype(outs[1].dtype)
            return (a * S + ctx.dot(xw, u, ta=True),)
        k = k_ref[rows, :]                                # x = q, y = do
        A = ins[6][rows, :] if decay is None else ctx.dot(x, k, tb=True) * scale * decay
        du = ctx.dot(A.astype(x.dtype), y, ta=True) + ctx.dot(k.astype(F32) * e_out, S)
        outs[1][rows, :] = du.astype(outs[1].dtype)
        return (a * S + ctx.dot(xw, y.astype(F32), ta=True) - ctx.dot(W, du, ta=True),)

    return step


def state_pass(ctx, x, y, G, doc, S0, *, reverse, scale=1.0, state_dtype, k=None, W=None,
               y_dtype=None, A=None):
    """The decay family's pass (k, W None) or the delta rule's (both given; y_dtype: u's / du's).

    x [B,Tp,H,Kp] (k forward, q reverse), y [B,Tp,H,Vp] (v / U forward, do reverse), G
    [B,Tp,H(,Kp)] float32 the gates' prefix sums (`common.prefix_sums`; any array for kind
    "none"), doc [B,Tp] int32, S0 [B,H,Kp,Vp] float32; A [B,Tp,H,C] the intra matrix, for the
    delta rule's reverse pass with a vector gate.
    Returns (states [B,H,N,Kp,Vp] in state_dtype, [u / du [B,Tp,H,Vp],] S_end float32)."""
    B, Tp, H, Kp = x.shape
    Vp, C, cfg = y.shape[-1], ctx.C, ctx.cfg
    N, delta = Tp // C, W is not None
    BK, BV = common.state_tiles(B * H, Kp, Vp, cfg, split_k=not delta, min_bv=32 if delta else 16)
    if delta:
        grid, seq = (B * H, Vp // BV), lambda X, x=None: common.spec(H, Tp, X, x=x)
        xs, ys, st = seq(Kp), seq(BV, 0), common.state_spec(H, Kp, BV, v=0)
        hs = common.states_spec(H, N, Kp, BV, v=0)
    else:
        grid = (B * H, Kp // BK, Vp // BV)
        xs, ys = common.spec(H, Tp, BK, x=0), common.spec(H, Tp, BV, x=1)
        st, hs = common.state_spec(H, BK, BV, k=0, v=1), common.states_spec(H, N, BK, BV, k=0, v=1)
    gs = common.spec(H, Tp, BK, x=None if delta else 0) if ctx.kind == "vector" else (
        common.spec(H, Tp))
    ins = [(x, xs), (y, ys), (G, gs), (doc, common.doc_spec(H, Tp))]
    outs = [(jax.ShapeDtypeStruct((B, H, N, Kp, Vp), state_dtype), hs)]
    if delta:
        ins += [(k, common.spec(H, Tp, Kp)), (W, common.spec(H, Tp, Kp))]
        if A is not None:
            ins.append((A, common.spec(H, Tp, C)))
        outs.append((jax.ShapeDtypeStruct((B, Tp, H, Vp), y_dtype), ys))
    family = "delta" if delta else "decay"
    stages = row_stages(cfg.stages_state, Kp, ctx.split_dots) if delta else cfg.stages_state
    return sequential(ctx, _step(ctx, reverse=reverse, delta=delta, scale=scale), ins=ins,
                      carry=[(S0, st)], outs=outs, grid=grid, N=N, reverse=reverse,
                      warps=cfg.warps_state, stages=stages,
                      name=f"{family}_state_{'bwd' if reverse else 'fwd'}")
