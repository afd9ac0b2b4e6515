"""mLSTM (`linear_jax.ops.mlstm`) as Mosaic TPU kernels, forward and backward, on the decay
family's grid, state carry and custom_vjp (`_decay`).

The chunkwise form is the Triton kernel's (`linear_jax.kernels.gpu.mlstm` states it in full): the
stabiliser m_t, a scalar max-plus recurrence, is formed in XLA first (`gates.running_max`), so the
kernels read m and m_prev (m_{t-1}) as per-token tables beside the input gate i, and every
exponent is <= 0. Per chunk, with l = logsigmoid(f) the scalar gate and the spans D, Gin, R, Gtot
of `linear_jax.kernels.tiles`, m_in = m_prev of the chunk's first row, m_out = m of its last:

    E_ij  = exp(D_ij + i_j - m_i) on causal same-document pairs,    P = scale (q k^T) * E
    w_i   = exp(Gin_i + m_in - m_i) on rows still in the entering document
    o     = P [v | 1] + scale w q S_in                     (the last column is the normaliser z)
    S_out = alpha S_in + (beta k)^T [v | 1],  alpha = keep exp(Gtot + m_in - m_out),
                                              beta_j = exp(R_j + i_j - m_out) on the last document

S = [C | n] is one state: v gets a column of ones (in the lane padding when V is not a multiple of
128, else one more lane block). The kernels write o and z in float32 and XLA normalises (eps, the
floor), as for the Triton kernel. The backward (`_decay`'s reverse sweep) writes dq, dk, dv, dl,
di, dm, dm_prev, with Z = dP * P, y = w scale q . (do S_in^T), sigma = beta k . ([v | 1] dS^T),
rho = alpha <S_in, dS_out>:

    di_j = sum_i Z_ij + sigma_j,     dm_i = -sum_j Z_ij - y_i - [i last] (rho + sum_j sigma_j)
    dm_prev_i = [i first] (sum y + rho),     dl = `tiles.scalar_gate_grad(Z, y, sigma, rho)`

and XLA's autodiff routes dm, dm_prev through the running max. Every span of gates is summed from
exactly its gates and the gate gradient routed back through the spans (exact at strong decay).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels import tiles
from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import _layout
from linear_jax.kernels.tpu._decay import KernelDef, run
from linear_jax.kernels.tpu.mosaic import F32, dot
from linear_jax.kernels.tpu.simple_gla import gate_grad, mask_dot, state_step
from linear_jax.ops.common.chunking import pad_time
from linear_jax.ops.common.gates import running_max
from linear_jax.ops.common.normalise import normalise

rowsum = lambda x: jnp.sum(x, axis=1, keepdims=True)       # noqa: E731


def _masked_exp(ok, x):
    return jnp.exp(jnp.where(ok, x, -jnp.inf))


class _Terms:
    """The chunk's factors E [C, C], w and beta [C, 1], alpha [1, 1] (module docstring)."""

    def __init__(self, ch, C):
        row, col = ch.row, ch.col
        i_col, i_row = ch.table(ch.scalars[0])
        m_col, m_row = ch.table(ch.scalars[1])
        mp_row = ch.table(ch.scalars[2])[1]
        lane = lax.broadcasted_iota(jnp.int32, (1, C), 1)
        m_in = rowsum(jnp.where(lane == 0, mp_row, 0.0))
        m_out = rowsum(jnp.where(lane == C - 1, m_row, 0.0))
        D, Gin, R, Gtot = tiles.scalar_spans(*ch.table(ch.g), row, col, mask_dot)
        same, in_rows, out_rows, keep = ch.masks
        every = lambda x, shape: jnp.ones(shape, bool) if x is None else x   # noqa: E731
        self.E = _masked_exp(same, D + i_row - m_col)
        self.w = _masked_exp(every(in_rows, (C, 1)), Gin + m_in - m_col)
        self.beta = _masked_exp(every(out_rows, (C, 1)), R + i_col - m_out)
        self.alpha = _masked_exp(every(keep, (1, 1)), Gtot + m_in - m_out)


def _fwd(ch, o_ref, S_in, extra, *, C, scale, mode, cfg):
    t = _Terms(ch, C)
    q, k, v = ch.q[...], ch.k[...], ch.v[...]
    P = dot(q, k, tb=True, mode=mode) * (scale * t.E)
    o_ref[...] = dot(P, v, mode=mode) + dot((scale * t.w) * q.astype(F32), S_in, mode=mode)
    return t.alpha * S_in + dot(t.beta * k.astype(F32), v, ta=True, mode=state_step(mode))


def _bwd(ch, S_in, do, dS, outs, extra, *, C, scale, mode, cfg):
    dq_ref, dk_ref, dv_ref, dl_ref, di_ref, dm_ref, dmp_ref = outs
    row, col = ch.row, ch.col
    t = _Terms(ch, C)
    q, k, v = ch.q[...], ch.k[...], ch.v[...]
    kf = k.astype(F32)
    qw = (scale * t.w) * q.astype(F32)
    P = dot(q, k, tb=True, mode=mode) * (scale * t.E)
    dP = dot(do, v, tb=True, mode=mode)                   # the ones column brings dz
    dq_in = dot(do, S_in, tb=True, mode=mode)             # dL/d(w scale q)   [C, K]
    dk_out = dot(v, dS, tb=True, mode=mode)               # dL/d(beta k)      [C, K]
    rho = t.alpha * jnp.sum(rowsum(S_in * dS), axis=0, keepdims=True)
    y = rowsum(qw * dq_in)
    sigma = t.beta * rowsum(kf * dk_out)
    Z = dP * P
    dPE = dP * (scale * t.E)
    dq_ref[...] = (dot(dPE, k, mode=mode) + (scale * t.w) * dq_in).astype(dq_ref.dtype)
    dk_ref[...] = (dot(dPE, q, ta=True, mode=mode) + t.beta * dk_out).astype(dk_ref.dtype)
    dv_ref[...] = (dot(P, do, ta=True, mode=mode)
                   + dot(t.beta * kf, dS, mode=mode)).astype(dv_ref.dtype)
    ch.store(dl_ref, gate_grad(ch, Z, y, sigma, rho))
    # di leaves as a row: the column sums of Z are one already
    di_ref[pl.ds(ch.idx, 1), :] = (jnp.sum(Z, axis=0, keepdims=True)
                                   + tiles.to_row(sigma, row, col))
    rid = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    total = jnp.sum(sigma, axis=0, keepdims=True) + rho
    ch.store(dm_ref, -rowsum(Z) - y - jnp.where(rid == C - 1, total, 0.0))
    ch.store(dmp_ref, jnp.where(rid == 0, jnp.sum(y, axis=0, keepdims=True) + rho, 0.0))
    return t.alpha * dS + dot(qw, do, ta=True, mode=state_step(mode))


_KERNEL = KernelDef("mlstm", vector_gate=False, fwd=_fwd, bwd=_bwd, scalars=3, f32_out=True)


def mlstm(q, k, v, i, f, *, scale, initial_state, segment_ids, chunk_size, eps,
          config: TpuConfig | None = None):
    """Same contract as `linear_jax.ops.mlstm.mlstm_chunk` (heads expanded), plus the kernel
    config (the registry always passes one; None takes `TpuConfig.default()`): returns h
    [B, T, H, V] in v's dtype and (C [B, H, K, V], n [B, H, K], m [B, H]) float32."""
    config = config or TpuConfig.default()
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    Tp = _layout.round_up(T, config.chunk_for(chunk_size, jnp.dtype(dtype).itemsize))
    if initial_state is None:
        S0, m0 = None, jnp.zeros((B, H), F32)
    else:
        C0, n0, m0 = (x.astype(F32) for x in initial_state)
        S0 = jnp.concatenate([C0, n0[..., None]], -1)
    ig, lf = i.astype(F32), jax.nn.log_sigmoid(f.astype(F32))
    m = running_max(ig, lf, m0, segment_ids)
    mp = jnp.concatenate([m0[:, None], m[:, :-1]], axis=1)
    # padded here, not by `run`: m continues the last row (the state leaving the last chunk is
    # stabilised by it) and a padded input gate writes nothing
    pad = lambda x, mode="constant": pad_time(x, Tp, mode=mode)           # noqa: E731
    ip = jnp.where(jnp.arange(Tp)[None, :, None] < T, pad(ig), -1e30)
    v1 = jnp.concatenate([v.astype(dtype), jnp.ones(v.shape[:-1] + (1,), dtype)], -1)
    seg = None if segment_ids is None else pad(segment_ids, "edge")
    o, S = run(_KERNEL, pad(q), pad(k), pad(v1), pad(lf), scale=scale, initial_state=S0,
               segment_ids=seg, chunk_size=chunk_size, config=config,
               scalars=(ip, pad(m, "edge"), pad(mp, "edge")))
    h = normalise(o[:, :T, :, :V], o[:, :T, :, V], m, eps)
    return h.astype(v.dtype), (S[..., :V], S[..., V], m[:, -1])
