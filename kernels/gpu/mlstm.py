"""Pallas GPU kernels of the chunkwise mLSTM (`mlstm`, impl="pallas"), Triton lowering.

The function is `linear_jax.ops.mlstm` (TFLA's chunkwise form, Beck et al. 2025): per chunk of C
rows, with q already scaled, l = logsigmoid(f), D_ij = sum_{j<s<=i} l_s, the entering state
(C_in, n_in, m_in) and the recurrent stabiliser m_i of every row,

    E_ij  = exp(D_ij + i_j - m_i)  on causal same-document pairs,   P = (q k^T) * E
    w_i   = exp(sum_{s<=i} l_s + m_in - m_i)  on rows still in the entering document
    o_i   = sum_j P_ij v_j + w_i C_in^T q_i,      z_i = sum_j P_ij + w_i n_in . q_i
    h_i   = o_i / (max(|z_i|, exp(min(-m_i, 80))) + eps)                 (the op's normalise)
    S_out = alpha S_in + sum_j beta_j k_j [v_j, 1]          (S = [C | n], both stabilised by m)
    alpha = keep exp(g + m_in - m_out),   g = the last document's gates in the chunk,
    beta_j = exp(R_j + i_j - m_out) on the last document's rows,   R_j = sum_{s>j} l_s

The kernels do not form m: it is the recurrent m_t itself, m_t = max(l_t + m_{t-1}, i_t)
(restarting from 0 at a reset), a scalar recurrence that XLA runs as one max-plus associative scan
(`linear_jax.ops.common.gates.running_max`). The kernels take m and m_prev (m_{t-1}; m_0's
predecessor is the initial m) as inputs, so m_in and m_out are m_prev of the chunk's first row and
m of its last; every exponent above is then <= 0 (up to rounding) whatever the gates, as in TFLA.
Their backward returns dm and dm_prev as plain partial derivatives, and XLA's autodiff of the scan
routes them through the max.
The normalisation (eps, the floor) also runs in XLA on the kernels' (o, z).

Kernels: the state pass (`_state_pass` on `chunk_state.sequential`, grid (B*H, V/BV), writes every
chunk's entering [C | n]),
the parallel output kernel (`_output`, grid (B*H, N, V/BV)); backward (`jax.custom_vjp`): the
reverse state pass (the same kernel: dS_n = alpha dS_{n+1} + sum_i w_i q_i [do_i, dz_i]), then one
parallel kernel per chunk (`_grads`) for dq, dk, dv, di, dl, dm, dm_prev, with Z = dP * P,
y_i = w_i q_i . (C_in do_i + n_in dz_i), sigma_j = beta_j k_j . (dC_out v_j + dn_out) and
rho = alpha <S_in, dS_out>:

    dm_i = -sum_j Z_ij - y_i,      dm_in += sum_i y_i + rho,      dm_out -= rho + sum_j sigma_j
    di_j = sum_i Z_ij + sigma_j
    dl_s = sum_{i>=s, j<s} Z_ij + sum_{i>=s} y_i + rho [s in the last document] + sum_{j<s} sigma_j

Every span of gates is summed from exactly the gates inside it and the gate gradient routed back
through the spans (`linear_jax.kernels.tiles`: D as a 0/1 product with l, dl =
`tiles.scalar_gate_grad(Z, y, sigma, rho)`), no difference of cumulative sums. Padding: T to a
multiple of C (padded rows add no state, their outputs are dropped), K to a power of two, V to a
multiple of 16.
bf16/fp16 inputs run dot operands in their dtype with float32 accumulation; float32 inputs run IEEE
float32 dots (the 0/1 span products as `common.Ctx.mask_dot`); states, gates and m are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.chunk_state import sequential
from linear_jax.kernels.gpu.common import F32, Chunk, Ctx
from linear_jax.ops.common.gates import running_max
from linear_jax.ops.common.normalise import normalise


class _Terms:
    """The chunk-n factors of the module docstring from the whole-T refs (i, l, m, m_prev, doc):
    alpha [1, 1]; beta, w [C, 1]; with `pairs` also E [C, C]; and the chunk (`common.Chunk`)."""

    def __init__(self, ctx, refs, n, T, pairs):
        i_ref, l_ref, m_ref, mp_ref, doc_ref = refs
        C = ctx.C
        rows = pl.ds(n * C, C)
        ig, l, m = i_ref[rows], l_ref[rows], m_ref[rows]
        m_in, m_out = mp_ref[n * C], m_ref[n * C + C - 1]
        self.ch = ch = Chunk(ctx, n, doc_ref)
        same, in_rows, out_rows, keep = ch.masks
        every = lambda x, shape: jnp.ones(shape, bool) if x is None else x
        # padded rows add no candidate and no state
        real_c = n * C + lax.broadcasted_iota(jnp.int32, (C, 1), 0) < T
        real_r = n * C + lax.broadcasted_iota(jnp.int32, (1, C), 1) < T
        D, Gin, R, Gtot = tiles.scalar_spans(l[:, None], l[None, :], ch.row, ch.col,
                                             ctx.mask_dot if pairs else None)
        masked_exp = lambda ok, x: jnp.exp(jnp.where(ok, x, -jnp.inf))
        self.alpha = masked_exp(every(keep, (1, 1)), Gtot + m_in - m_out)
        self.beta = masked_exp(every(out_rows, (C, 1)) & real_c, R + ig[:, None] - m_out)
        self.w = masked_exp(every(in_rows, (C, 1)), Gin + m_in - m[:, None])
        if pairs:
            self.E = masked_exp(same & real_r, D + ig[None, :] - m[:, None])


def _gate_specs(H, Tp):
    return [common.spec(H, Tp)] * 4 + [common.doc_spec(H, Tp)]


def _state_pass(ctx, x, y, y1, gates, S0, s0, *, T, reverse, scale):
    """Forward (x = k, y = v, y1 None: the normaliser's column of ones):
        S_{n+1} = alpha S_n + sum_j beta_j k_j [v_j, 1].
    Reverse (x = q, y = do, y1 = dz):
        dS_n = alpha dS_{n+1} + sum_i w_i scale q_i [do_i, dz_i].
    Writes the state on one side of every chunk (forward: entering; reverse: leaving) and the end
    state: ([B,H,N,Kp,Vp], [B,H,N,Kp], [B,H,Kp,Vp], [B,H,Kp]) float32."""
    B, Tp, H, Kp = x.shape
    Vp, C, cfg = y.shape[-1], ctx.C, ctx.cfg
    N = Tp // C
    _, BV = common.state_tiles(B * H, Kp, Vp, cfg, split_k=False)

    def step(n, carry, ins, outs, pids):
        S, s = carry
        x_ref, y_ref, *refs = ins
        y1_ref, gate_refs = (refs[0], refs[1:]) if reverse else (None, refs)
        hs_ref, ns_ref = outs
        hs_ref[n] = S

        @pl.when(pids[1] == 0)                    # the V tile that writes the normaliser
        def _():
            ns_ref[n] = s

        t = _Terms(ctx, gate_refs, n, T, pairs=False)
        rows = pl.ds(n * C, C)
        xn = x_ref[rows, :].astype(F32) * (t.w * scale if reverse else t.beta)
        S = t.alpha * S + ctx.dot(xn.astype(x.dtype), y_ref[rows, :].astype(x.dtype), ta=True)
        col = xn * y1_ref[rows][:, None] if reverse else xn
        return S, jnp.sum(t.alpha) * s + jnp.sum(col, axis=0)

    vec = pl.BlockSpec((None, None, Kp), lambda bh, j: (bh // H, bh % H, 0))
    ins = [(x, common.spec(H, Tp, Kp)), (y, common.spec(H, Tp, BV, x=0))]
    ins += [(y1, common.spec(H, Tp))] if reverse else []
    ins += list(zip(gates, _gate_specs(H, Tp), strict=True))
    outs = [(jax.ShapeDtypeStruct((B, H, N, Kp, Vp), F32), common.states_spec(H, N, Kp, BV, v=0)),
            (jax.ShapeDtypeStruct((B, H, N, Kp), F32),
             pl.BlockSpec((None, None, N, Kp), lambda bh, j: (bh // H, bh % H, 0, 0)))]
    return sequential(ctx, step, ins=ins, carry=[(S0, common.state_spec(H, Kp, BV, v=0)),
                                                (s0, vec)],
                      outs=outs, grid=(B * H, Vp // BV), N=N, reverse=reverse,
                      warps=cfg.warps_state, stages=cfg.stages_state,
                      name="mlstm_state_bwd" if reverse else "mlstm_state_fwd")


def _chunk_vec(H, Kp):
    """[B, H, N, Kp] per-chunk normaliser states: chunk n's row."""
    return pl.BlockSpec((None, None, None, Kp), lambda bh, n, *g: (bh // H, bh % H, n, 0))


def _output(ctx, q, k, v, gates, hs, ns, *, T, scale):
    """(o [B, Tp, H, Vp], z [B, Tp, H]) float32: the unnormalised output and normaliser."""
    B, Tp, H, Kp = q.shape
    Vp, C, cfg = v.shape[-1], ctx.C, ctx.cfg
    N, BV = Tp // C, common.value_block(Vp, cfg.block_v_out)

    def kernel(q_ref, k_ref, v_ref, *refs):
        gate_refs, (h_ref, n_ref, o_ref, z_ref) = refs[:5], refs[5:]
        t = _Terms(ctx, gate_refs, pl.program_id(1), T, pairs=True)
        q = q_ref[...]
        P = ctx.dot(q, k_ref[...], tb=True) * scale * t.E
        qs = q.astype(F32) * scale
        o = ctx.dot(P.astype(q.dtype), v_ref[...]) + t.w * ctx.dot(
            qs.astype(q.dtype), h_ref[...].astype(q.dtype))
        o_ref[...] = o

        @pl.when(pl.program_id(2) == 0)
        def _():
            z_ref[...] = jnp.sum(P, axis=1) + jnp.sum(t.w * qs * n_ref[...][None, :], axis=1)

    return ctx.call(
        kernel, grid=(B * H, N, Vp // BV),
        in_specs=[common.spec(H, C, Kp, t=0), common.spec(H, C, Kp, t=0),
                  common.spec(H, C, BV, t=0, x=1), *_gate_specs(H, Tp),
                  common.states_spec(H, N, Kp, BV, n=0, v=1), _chunk_vec(H, Kp)],
        out_specs=[common.spec(H, C, BV, t=0, x=1), common.spec(H, C, t=0)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Vp), F32),
                   jax.ShapeDtypeStruct((B, Tp, H), F32)],
        warps=cfg.warps_out, stages=cfg.stages_out, name="mlstm_output",
    )(q, k, v, *gates, hs, ns)


def _grads(ctx, q, k, v, gates, hs, ns, dhs, dns, do, dz, *, T, scale):
    """dq, dk, dv (input dtypes) and di, dl, dm, dm_prev [B, Tp, H] float32 (module docstring)."""
    B, Tp, H, Kp = q.shape
    Vp, C, cfg = v.shape[-1], ctx.C, ctx.cfg
    N, BV = Tp // C, common.value_block(Vp, cfg.block_v_out)
    cd = q.dtype
    rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)

    def kernel(q_ref, k_ref, v_ref, *refs):
        gate_refs, refs = refs[:5], refs[5:]
        h_ref, n_ref, dh_ref, dn_ref, do_ref, dz_ref = refs[:6]
        dq_ref, dk_ref, dv_ref, di_ref, dl_ref, dm_ref, dmp_ref = refs[6:]
        t = _Terms(ctx, gate_refs, pl.program_id(1), T, pairs=True)
        ch = t.ch
        q, k = q_ref[...], k_ref[...]
        qs = q.astype(F32) * scale
        P = ctx.dot(q, k, tb=True) * scale * t.E
        kb = (k.astype(F32) * t.beta).astype(cd)
        dz = dz_ref[...]
        dP = jnp.broadcast_to(dz[:, None], (C, C))
        dq_in = dz[:, None] * n_ref[...][None, :]          # C_in do_i + n_in dz_i, rows i
        dk_out = jnp.broadcast_to(dn_ref[...][None, :], (C, Kp))   # dC_out v_j + dn_out
        rho = jnp.sum(n_ref[...] * dn_ref[...])
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            v_b, do_b, h_b, dh_b = v_ref[:, cols], do_ref[:, cols], h_ref[:, cols], dh_ref[:, cols]
            dP += ctx.dot(do_b.astype(cd), v_b, tb=True)
            dq_in += ctx.dot(do_b.astype(cd), h_b.astype(cd), tb=True)
            dk_out += ctx.dot(v_b, dh_b.astype(cd), tb=True)
            rho += jnp.sum(h_b * dh_b)
            dv = (ctx.dot(P.astype(cd), do_b.astype(cd), ta=True)
                  + ctx.dot(kb, dh_b.astype(cd)))
            dv_ref[:, cols] = dv.astype(dv_ref.dtype)
        rho = t.alpha * rho
        y = t.w * rowsum(qs * dq_in)
        sigma = t.beta * rowsum(k.astype(F32) * dk_out)
        Z = dP * P
        dPE = (dP * t.E).astype(cd)
        dq_ref[...] = ((ctx.dot(dPE, k) + t.w * dq_in) * scale).astype(dq_ref.dtype)
        dk_ref[...] = (ctx.dot(dPE, q, ta=True) * scale + t.beta * dk_out).astype(dk_ref.dtype)
        last = jnp.arange(C, dtype=jnp.int32) == C - 1
        di_ref[...] = jnp.sum(Z, axis=0) + jnp.sum(sigma, axis=1)
        dl_ref[...] = ch.scalar_grad(Z, y, sigma, rho)
        dm_ref[...] = (-jnp.sum(Z, axis=1) - jnp.sum(y, axis=1)
                       - jnp.where(last, jnp.sum(rho) + jnp.sum(sigma), 0.0))
        dmp_ref[...] = jnp.where(jnp.arange(C, dtype=jnp.int32) == 0, jnp.sum(y) + jnp.sum(rho),
                                 0.0)

    rows = lambda X: common.spec(H, C, X, t=0)
    state = common.states_spec(H, N, Kp, Vp, n=0)
    scalar = common.spec(H, C, t=0)
    shp = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    sc = jax.ShapeDtypeStruct((B, Tp, H), F32)
    return ctx.call(
        kernel, grid=(B * H, N),
        in_specs=[rows(Kp), rows(Kp), rows(Vp), *_gate_specs(H, Tp), state, _chunk_vec(H, Kp),
                  state, _chunk_vec(H, Kp), rows(Vp), scalar],
        out_specs=[rows(Kp), rows(Kp), rows(Vp)] + [scalar] * 4,
        out_shape=[shp(q), shp(k), shp(v), sc, sc, sc, sc],
        warps=cfg.warps_bwd, stages=cfg.stages_bwd, name="mlstm_backward",
    )(q, k, v, *gates, hs, ns, dhs, dns, do, dz)


@functools.cache
def _core(ctx: Ctx, T: int, scale: float):
    """custom_vjp of the padded (q, k, v, i, l, m, m_prev, doc, C0, n0) -> (o, z, C_T, n_T)."""
    kw = dict(T=T, scale=scale)

    def fwd(q, k, v, i, l, m, mp, doc, C0, n0, residuals):
        gates = (i, l, m, mp, doc)
        hs, ns, CT, nT = _state_pass(ctx, k, v, None, gates, C0, n0, reverse=False, **kw)
        o, z = _output(ctx, q, k, v, gates, hs, ns, **kw)
        return (o, z, CT, nT), (q, k, v, gates, hs, ns)

    def bwd(res, cts):
        q, k, v, gates, hs, ns = res
        do, dz, dCT, dnT = cts
        dhs, dns, dC0, dn0 = _state_pass(ctx, q, do, dz, gates, dCT, dnT, reverse=True, **kw)
        dq, dk, dv, di, dl, dm, dmp = _grads(ctx, q, k, v, gates, hs, ns, dhs, dns, do, dz, **kw)
        return dq, dk, dv, di, dl, dm, dmp, None, dC0, dn0

    return common.custom_vjp(fwd, bwd)


def mlstm(q, k, v, i, f, *, scale, initial_state, segment_ids, chunk_size, eps, config=None):
    """The op's chunk-impl signature (heads expanded) plus the kernel config (the registry always
    passes one; None takes `TritonChunkConfig.default()`): returns (h [B, T, H, V] in v's dtype,
    (C [B, H, K, V], n [B, H, K], m [B, H]) float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    p, doc = common.entry(q, v, segment_ids, chunk_size, config)
    ctx = Ctx(p.cfg, "scalar", segment_ids is not None, p.dtype == F32)
    if initial_state is None:
        C0, n0, m0 = None, None, jnp.zeros((B, H), F32)
    else:
        C0, n0, m0 = (s.astype(F32) for s in initial_state)
    ig, l = i.astype(F32), jax.nn.log_sigmoid(f.astype(F32))
    m = running_max(ig, l, m0, segment_ids)
    mp = jnp.concatenate([m0[:, None], m[:, :-1]], axis=1)
    o, z, CT, nT = _core(ctx, T, float(scale))(
        p(q, p.Kp), p(k, p.Kp), p(v, p.Vp), p.scalars(ig), p.scalars(l),
        p.scalars(m, mode="edge"), p.scalars(mp, mode="edge"), doc,
        p.state(C0, B, H, K, V), p.state(n0, B, H, K))
    h = normalise(o[:, :T, :, :V], z[:, :T], m, eps)
    return h.astype(v.dtype), (CT[:, :, :K, :V], nT[:, :, :K], m[:, -1])
