"""mLSTM on the Hopper simple-GLA kernels (`HopperMlstmConfig.form = "simple_gla"`): the stabilised
mLSTM state is a scalar-gate linear recurrence on rescaled keys, so the numerator runs through
`decay.simple_gla`'s forward and backward kernels and only the normaliser stays in XLA.

With l = logsigmoid(f) and the recurrent stabiliser m_t = max(l_t + m_{t-1}, i_t) (`linear_jax.ops
.mlstm` states the cell; `mlstm.mlstm` forms m with `gates.running_max`), the stabilised state C_t
obeys

    C_t = exp(g'_t) C_{t-1} + k'_t v_t^T,   g'_t = l_t + m_{t-1} - m_t <= 0,
                                            k'_t = exp(i_t - m_t) k_t   (|k'_t| <= |k_t|)

and n_t the same recurrence with v_t = 1. So num_t = s q_t C_t is simple GLA on (q, k', v, g'),
and den_t = s q_t . n_t is simple GLA on (q, k', 1, g'); h_t = num_t / (max(|den_t|, exp(-m_t)) +
eps) (`normalise`). A document start drops the state (the kernel's documents; m restarts from 0 as
`running_max` does, and k'_t, g'_t follow from that m); the initial state (C0, n0, m0) enters as
the kernel's initial state with m_{-1} = m0. The final (C, n, m) is the kernel's final state, the
normaliser's, and m at the last token.

Precision: k' is rounded to the inputs' dtype after its float32 rescaling (a relative 2^-9 in
bf16, as k itself), the numerator carries the kernels' bf16 operands as the tile kernels' does;
the normaliser is float32 (`decay_chunk.chunk_decay` with a value column of ones): dividing by a
small |den| amplifies the numerator's rounding, never a rounding of the denominator.

Cost at B = 8, T = 2048, H = 16, K = V = 128: the simple-GLA kernels (fwd+bwd ~0.8-1.0 ms on an
H200 / H100, the fastest kernels of this library against jax-linear-attention), m's associative
scan, k' (one bf16 pass over k), the normaliser's chunk form (per 64-token chunk a [64, K] x
[K, 64] float32 score tile and a state column: ~4.3 GFLOP and ~70 MB) and their XLA VJPs.
jax-linear-attention's mLSTM takes this route; the tile kernels (`mlstm.py`) are the other form.
Not yet timed on a device.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from linear_jax.kernels.configs import HopperChunkConfig, HopperMlstmConfig
from linear_jax.kernels.gpu.hopper import decay
from linear_jax.kernels.gpu.hopper.common import f32
from linear_jax.ops.common.decay_chunk import chunk_decay
from linear_jax.ops.common.normalise import normalise


def mlstm(q, k, v, ig, lf, m, h0, *, scale, segment_ids, eps, cfg: HopperMlstmConfig):
    """`mlstm.mlstm`'s result through the simple-GLA kernels (the module docstring), from its
    float32 input gates ig, log forget gates lf and stabiliser m [B, T, H] and h0 None or the
    float32 (C0, n0, m0)."""
    B, T, H, _ = q.shape
    m0 = jnp.zeros((B, H), f32) if h0 is None else h0[2]
    # g at a document's first token multiplies only the dropped state: m_prev needs no reset
    g = lf + jnp.concatenate([m0[:, None], m[:, :-1]], axis=1) - m
    kw = jnp.exp(ig - m)[..., None] * k.astype(f32)
    gla_cfg = dataclasses.replace(HopperChunkConfig.default(), interpret=cfg.interpret,
                                  semantics=cfg.semantics)
    num, C = decay.simple_gla(q, kw.astype(k.dtype), v, g, scale=scale,
                              initial_state=None if h0 is None else h0[0],
                              segment_ids=segment_ids, chunk_size=64, config=gla_cfg)
    ones = jnp.ones((B, T, H, 1), f32)
    den, n = chunk_decay(q.astype(f32), kw, ones, g, scale=scale,
                         initial_state=None if h0 is None else h0[1][..., None],
                         segment_ids=segment_ids, chunk_size=64)
    h = normalise(num.astype(f32), den[..., 0], m, eps)
    return h.astype(v.dtype), (C, n[..., 0], m[:, -1])
