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
bf16, as k itself), the numerator carries the kernels' bf16 operands as the tile kernels' does.
The normaliser (`normaliser`) never rounds w k: its scores are products of the bf16 q and k as
given, exact in a float32 accumulator, and w and the decays multiply them afterwards, so dividing
by a small |den| amplifies the numerator's rounding, never a rounding of the denominator.

Cost (H100, B = 8, T = 2048, H = 16, K = V = 128, bf16; session 21, jax-linear-attention timed in
the same process): fwd+bwd 2.71 ms sync (2.48 device) against jax-linear-attention's 2.28 and the
tile kernels' 3.14; forward 0.85 against 0.77 and 0.52. At B = 2, T = 8192: 2.95 against 2.50
and 3.67. The simple-GLA kernels take 0.56 ms of the fwd+bwd (jax-linear-attention's own 0.71);
the rest is XLA, led by one transpose-only fusion of 0.67 ms at both shapes that the normaliser
does not cause (it stayed when the normaliser's float32 `chunk_decay`, which made the form 0.6 ms
slower, gave way to the bf16-product chunk form below): finding it is the next step
(`hopper_ssm_gpu.py --profile` prints the slow fusions' HLO). jax-linear-attention's mLSTM takes
this route; the tile kernels (`mlstm.py`) are the other form.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.configs import HopperChunkConfig, HopperMlstmConfig
from linear_jax.kernels.gpu.hopper import decay
from linear_jax.kernels.gpu.hopper.common import f32
from linear_jax.ops.common.chunking import doc_masks, from_chunks, to_chunks
from linear_jax.ops.common.gates import cumsum_incl, rev_cumsum_excl, segsum
from linear_jax.ops.common.normalise import normalise

CHUNK = 64


def mlstm(q, k, v, ig, lf, m, h0, *, scale, segment_ids, eps, cfg: HopperMlstmConfig):
    """`mlstm.mlstm`'s result through the simple-GLA kernels (the module docstring), from its
    float32 input gates ig, log forget gates lf and stabiliser m [B, T, H] and h0 None or the
    float32 (C0, n0, m0)."""
    B, T, H, _ = q.shape
    m0 = jnp.zeros((B, H), f32) if h0 is None else h0[2]
    # g at a document's first token multiplies only the dropped state: m_prev needs no reset
    g = lf + jnp.concatenate([m0[:, None], m[:, :-1]], axis=1) - m
    w = jnp.exp(ig - m)
    kw = (w[..., None] * k.astype(f32)).astype(k.dtype)
    gla_cfg = dataclasses.replace(HopperChunkConfig.default(), interpret=cfg.interpret,
                                  semantics=cfg.semantics)
    num, C = decay.simple_gla(q, kw, v, g, scale=scale,
                              initial_state=None if h0 is None else h0[0],
                              segment_ids=segment_ids, chunk_size=CHUNK, config=gla_cfg)
    den, n = normaliser(q, k, w, g, None if h0 is None else h0[1], scale=scale,
                        segment_ids=segment_ids)
    h = normalise(num.astype(f32), den, m, eps)
    return h.astype(v.dtype), (C, n, m[:, -1])


def normaliser(q, k, w, g, n0, *, scale, segment_ids):
    """den_t = scale q_t . n_t [B, T, H] and the final n [B, H, K], both float32, for
    n_t = exp(g_t) n_{t-1} + w_t k_t (n_{-1} = n0 or 0; a document start drops n), chunkwise.

    The intra-chunk scores q k^T take q and k as given (bf16 products, exact in the float32
    accumulator, on the tensor cores) and w and the decays after the product, so the denominator
    carries no rounding of w k; the chunk states pass by an associative scan over the chunks (no
    sequential loop of T / 64 steps)."""
    T = q.shape[1]
    qc, kc = to_chunks(q, CHUNK), to_chunks(k, CHUNK)            # [B, H, N, C, K]
    wc, gc = to_chunks(w, CHUNK), to_chunks(g, CHUNK)            # [B, H, N, C]; padding w = g = 0
    N = qc.shape[2]
    same, in_rows, out_rows, keep = doc_masks(segment_ids, T, CHUNK, N)
    hi = lax.Precision.HIGHEST if q.dtype == f32 else None
    scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, precision=hi, preferred_element_type=f32)
    decay = jnp.exp(jnp.where(same, segsum(gc), -jnp.inf))
    intra = jnp.sum(scores * decay * wc[..., None, :], axis=-1)
    # what each chunk writes into n from zero, and how much of the entering n survives it
    k_out = jnp.where(out_rows, jnp.exp(rev_cumsum_excl(gc, 3)) * wc, 0.0)
    local = jnp.einsum("bhnc,bhnck->bhnk", k_out, kc.astype(f32), precision=lax.Precision.HIGHEST)
    a = jnp.where(keep, jnp.exp(gc.sum(3)), 0.0)                 # [B, H, N]
    combine = lambda x, y: (x[0] * y[0], y[0][..., None] * x[1] + y[1])   # noqa: E731
    total, n_out = lax.associative_scan(combine, (a, local), axis=2)
    if n0 is not None:
        n_out = n_out + total[..., None] * n0[:, :, None]
    start = jnp.zeros_like(n_out[:, :, :1]) if n0 is None else n0[:, :, None]
    n_in = jnp.concatenate([start, n_out[:, :, :-1]], axis=2)
    q_in = jnp.where(in_rows, jnp.exp(cumsum_incl(gc, 3)), 0.0)
    inter = q_in * jnp.einsum("bhnck,bhnk->bhnc", qc.astype(f32), n_in,
                              precision=lax.Precision.HIGHEST)
    return scale * from_chunks(intra + inter, T), n_out[:, :, -1]
