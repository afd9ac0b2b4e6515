"""Chunkwise mLSTM (xLSTM's matrix memory; `linear_jax.ops.mlstm` states the math) on Hopper:
Mosaic GPU kernels for the intra-chunk output and its VJP with the stabiliser and normaliser
inside, TFLA's two-level tiling (Beck et al. 2025): chunks of L = 128 or 256 tokens between stored
states, tiles of 64 queries x 64 keys inside the kernels, so a chunk never has to fit SMEM at once.

With l = logsigmoid(f), per chunk of L tokens F_i = sum_{s <= i} l_s (chunk-local), the chunk's
entering state (C_in, n_in, m_in), the recurrent stabiliser m_i and, for query row i and key
column j <= i of the chunk in the same document,

    log D_ij = F_i - F_j + i_j = a_i + b_j + m_i,    a_i = F_i - m_i + log s,  b_j = i_j - F_j
    w_i      = s exp(F_i + m_in - m_i) on rows still in the document that entered the chunk, else 0
    num_i    = sum_j (q_i . k_j) exp(a_i + b_j) v_j + w_i q_i C_in
    den_i    = sum_j (q_i . k_j) exp(a_i + b_j)     + w_i q_i . n_in
    h_i      = num_i / (max(|den_i|, exp(-m_i)) + eps)

with q unscaled and s the op's `scale`, folded into the row factors a and w in float32: a q
scaled in bf16 would be rounded (s = 128^-0.5 is no power of two), and that rounding cost the
gradients 4 % at K = 128 (0.35 % at K = 64, where s = 1/8 is exact). m is the recurrent m_t
itself, m_t = max(l_t + m_{t-1}, i_t) (0 again after a reset), one max-plus
associative scan in XLA (`gates.running_max`) formed before any matmul, so the kernels need no
online rescaling and every exponent is <= 0. The chunk states come from the float32 chunk
recurrence in XLA (`_states`: per chunk a [K, L] x [L, V + 1] matmul, the normaliser a column of
ones; the scan over T / L chunks is short; `HopperMlstmConfig(states="matmul")` forms them
without the serial loop instead, `_states_matmul`, the default up to 64 chunks). Packed
documents (segment ids) enter as the document row: pairs across documents are masked, w is 0 on
rows cut off from the entering state, and the chunk recurrence resets exactly as the chunk
form's.

Forward (`mlstm_fwd.out_kernel`): grid (B, H, T / 64), one warpgroup per 64 query rows; TMA
brings the q tile, the key and value tiles of its chunk (L / 64 of each), the chunk's C_in (bf16)
and n_in; per key tile q k^T (wgmma), the factor exp(min(a_i + b_j, 0)) on the causal
same-document pairs, P v (wgmma, P from registers) and the row sums of P; then q C_in and q . n_in
scaled by w; h normalised and written by TMA. Key tiles after the query tile are masked (P = 0),
not skipped: at L = 128 a quarter of the intra work is wasted, the price of a static loop.

Fused forward (`HopperMlstmConfig.fused_forward`, the default, `mlstm_fused`): one kernel on the
grid (B, H, V / 64) walks the 64-token tiles with (C, n) on chip, reading the token stabiliser m
from XLA, so no chunk-state pass runs in the forward (0.36 ms against 1.11 for the chunk states
plus the kernel above, H100, B = 8, T = 2048, H = 16, K = V = 128); under differentiation it also
writes C_in, n_in (every L tokens) and den, and `_fused_core`'s backward runs the kernels below on
them plus XLA's VJP of the chunk states (`_states_of`).

Backward (`mlstm_bwd`): the intra-chunk VJP in two kernels on the same grid. With the normaliser's
VJP per row (dnum = dh / denom, dden = sign(den) dL/d denom where |den| wins, the floor's share to
m), dP = dnum v^T + dden, Z = dP * P (the pair terms' log gradient):

    dq = (dP * E) k + w (dnum C_in^T + dden n_in),   dk = (dP * E)^T q,   dv = P^T dnum
    dC_in = (w q)^T dnum,  dn_in = sum_i w_i dden_i q_i
    w dw_i = w_i (dnum_i . q_i C_in + dden_i q_i . n_in)
    di_j = sum_i Z_ij,     dm_i = -(sum_j Z_ij + w dw_i + floor share),     dm_in = sum_i w dw_i
    dl_s = sum_{i >= s > j} Z_ij + sum_{i >= s} w dw_i

The forget-gate term routes each pair to exactly the gates of its span (no difference of
cumulative sums, so dl stays exact at strong decay; `linear_jax.kernels.tiles`); the query kernel
forms it per tile with X = Z U on wgmma (U the strictly upper 0/1 matrix). The chunk recurrence,
the stabiliser's scan and the casts are differentiated by XLA (`jax.custom_vjp` around the kernels
only), as the forward runs them in XLA.

Roofline at B = 8, T = 2048, H = 16, K = V = 128, bf16 (H200 ~4.3 TB/s, ~790 TFLOP/s):
  forward   q, k, v in, h out (4 x 67 MB), key / value tiles re-read per query tile (L / 64 = 2:
            +134 MB, from L2 mostly), chunk states (B H T / L K V 2 B = 67 MB at L = 128)
            ~470 MB 0.11 ms; FLOPs 2 B H T (L (K + V) + 2 K V) ~ 35 GFLOP, ~0.05 ms:
            bandwidth-bound, like the scalar-gate chunk forward.
  backward  queries: q, dh, h, the chunk's k, v (x2) and C_in in, dq out, dC_in partials (float32,
            one per query tile: 268 MB) ~870 MB; keys: k, v, the chunk's q, dh (x2) in, dk, dv out
            ~540 MB; ~1.4 GB, ~0.33 ms; ~3x the forward's FLOPs, still bandwidth-bound.

The other form (`HopperMlstmConfig.form = "simple_gla"`, `mlstm_gla`): the stabilised state as
simple GLA on rescaled keys through the simple-GLA kernels, the normaliser in XLA.

Inputs bf16 / fp16; K = V = 64 or 128; T padded to a multiple of L. The backward's SMEM fits
L <= 128 at K = V = 128 (L = 256 at 64).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.kernels.configs import HopperMlstmConfig
from linear_jax.kernels.gpu.hopper import mlstm_gla
from linear_jax.kernels.gpu.hopper.common import LANES, f32, padded_doc
from linear_jax.kernels.gpu.hopper.mlstm_bwd import grad_keys, grad_queries
from linear_jax.kernels.gpu.hopper.mlstm_fused import fused_forward, tile_rows
from linear_jax.kernels.gpu.hopper.mlstm_fwd import out_kernel
from linear_jax.ops.common.chunking import doc_masks, pad_time
from linear_jax.ops.common.gates import rev_cumsum_excl, running_max


def accepts(q, k, v, *rest) -> str | None:
    """Whether the Hopper mLSTM kernel takes these inputs (None) or why not."""
    dt = jnp.result_type(q, k, v)
    if dt not in (jnp.bfloat16, jnp.float16):
        return (f"the Mosaic GPU mLSTM kernel takes bfloat16 or float16 inputs, got {dt}; "
                f"float32 runs on impl='pallas:triton' or impl='chunk'")
    K, V = q.shape[-1], v.shape[-1]
    if K not in (64, 128) or V not in (64, 128):
        return (f"the Mosaic GPU mLSTM kernel takes K, V in (64, 128), got K={K}, V={V}; use "
                f"impl='pallas:triton'")
    return None


def _chunk_terms(k, v, i, lf, segment_ids, T, L):
    """What each chunk adds, the inputs of both chunk-state forms: the keys weighted by what
    their rows write, exp(w - wmax) k [B, H, NL, L, K], the values [B, H, NL, L, V] (float32),
    and per chunk [B, H, NL] the largest write wmax, its last document's gates and whether it
    keeps the state entering it (no document starts in it)."""
    B, Tp, H, K = k.shape
    NL = Tp // L
    hm = lambda x: jnp.moveaxis(x, 2, 1).reshape((B, H, NL, L) + x.shape[3:])   # noqa: E731
    ic, lc = hm(i), hm(lf)
    _, _, out_rows, keep = doc_masks(segment_ids, T, L, NL)
    real = (jnp.arange(Tp) < T).reshape(1, 1, NL, L)
    wr = jnp.where(out_rows & real, rev_cumsum_excl(lc, 3) + ic, -jnp.inf)   # what a row writes
    wmax = jnp.max(wr, -1)
    kw = hm(k).astype(f32) * jnp.exp(wr - wmax[..., None])[..., None]
    last = jnp.sum(jnp.where(out_rows, lc, 0.0), -1)         # the gates of the last document
    return kw, hm(v).astype(f32), wmax, last, jnp.broadcast_to(keep, wmax.shape)


def _states(k, v, i, lf, h0, segment_ids, T, L):
    """The chunk recurrence in float32 (XLA, as `linear_jax.ops.mlstm.mlstm_chunk`'s): per chunk
    the entering ([C | n] [B, H, NL, K, V + 1], m_in [B, H, NL]) and the final (C, n, m)."""
    B, Tp, H, K = k.shape
    V = v.shape[-1]
    kw, vc, wmax, last, keep = _chunk_terms(k, v, i, lf, segment_ids, T, L)
    vc = jnp.concatenate([vc, jnp.ones(vc.shape[:-1] + (1,), f32)], -1)
    dS = jnp.einsum("bhnck,bhncv->bhnkv", kw, vc, preferred_element_type=f32)
    if h0 is None:
        S0, m0 = jnp.zeros((B, H, K, V + 1), f32), jnp.zeros((B, H), f32)
    else:
        S0, m0 = jnp.concatenate([h0[0], h0[1][..., None]], -1), h0[2]

    def step(carry, x):
        S, m = carry
        dS_n, a_n, g_n, keep_n = x
        m_e = jnp.where(keep_n, m, 0.0)                     # a reset restarts from zero
        m_new = jnp.maximum(g_n + m_e, a_n)
        S_e = jnp.where(keep_n[..., None, None], S, 0.0)
        S_new = (jnp.exp(g_n + m_e - m_new)[..., None, None] * S_e
                 + jnp.exp(a_n - m_new)[..., None, None] * dS_n)
        return (S_new, m_new), (S, m)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (dS, wmax, last, keep))
    (S_fin, m_fin), (S_in, m_in) = lax.scan(step, (S0, m0), xs)
    S_in, m_in = jnp.moveaxis(S_in, 0, 2), jnp.moveaxis(m_in, 0, 2)
    return S_in, m_in, (S_fin[..., :V], S_fin[..., V], m_fin)


def _states_matmul(k, v, i, lf, h0, segment_ids, T, L):
    """`_states` without its serial loop (`HopperMlstmConfig.states = "matmul"`): C_in
    [B, H, NL, K, V], n_in [B, H, NL, K] (float32, apart: no V + 1 column), m_in [B, H, NL] and
    the final (C, n, m).

    A chunk is the map x -> max(x + g_n, a_n) of the stabiliser (g_n its last document's gates,
    a_n the max of what its rows write; a reset forgets x: g -> -inf, a -> max(g_n, a_n), as
    `gates.running_max`), so one max-plus associative scan over the chunks gives m after every
    chunk. The state after chunk p - 1 is then sum_{j < p} exp(a_j + E_pj - m_{p-1}) dS_j
    (+ exp(m_0 + E_p - m_{p-1}) S_0): E_pj the sum of g_c over j < c < p (-inf across a reset),
    summed over the chunks between (no difference of cumulative sums), every weight <= 1. One
    float32 [NL + 1, NL] x [NL, K V] product per (b, h) forms all NL + 1 of them (the last is the
    final state); its gradient is two more products, not a reverse loop."""
    B, H = k.shape[0], k.shape[2]
    NL = k.shape[1] // L
    kw, vc, wmax, last, keep = _chunk_terms(k, v, i, lf, segment_ids, T, L)
    dC = jnp.einsum("bhnck,bhncv->bhnkv", kw, vc, preferred_element_type=f32)
    dn = jnp.sum(kw, 3)                                                     # [B, H, NL, K]
    g = jnp.where(keep, last, -jnp.inf)
    a = jnp.where(keep, wmax, jnp.maximum(last, wmax))
    m0 = jnp.zeros((B, H), f32) if h0 is None else h0[2]
    combine = lambda x, y: (x[0] + y[0], jnp.maximum(x[1] + y[0], y[1]))   # noqa: E731
    cg, ca = lax.associative_scan(combine, (g, a), axis=2)
    m_prev = jnp.concatenate([m0[..., None], jnp.maximum(m0[..., None] + cg, ca)], -1)
    p = jnp.arange(NL + 1)[:, None, None]
    j = jnp.arange(NL)[None, :, None]
    c = jnp.arange(NL)[None, None, :]
    E = jnp.sum(jnp.where((j < c) & (c < p), g[..., None, None, :], 0.0), -1)   # [B,H,NL+1,NL]
    W = jnp.exp(jnp.where(j[..., 0] < p[..., 0], wmax[..., None, :] + E - m_prev[..., None],
                          -jnp.inf))
    hi = lax.Precision.HIGHEST
    Cs = jnp.einsum("bhpj,bhjkv->bhpkv", W, dC, precision=hi, preferred_element_type=f32)
    ns = jnp.einsum("bhpj,bhjk->bhpk", W, dn, precision=hi, preferred_element_type=f32)
    if h0 is not None:
        E0 = jnp.sum(jnp.where(c[0] < p[..., 0], g[..., None, :], 0.0), -1)       # [B, H, NL+1]
        W0 = jnp.exp(m0[..., None] + E0 - m_prev)
        Cs = Cs + W0[..., None, None] * h0[0][:, :, None]
        ns = ns + W0[..., None] * h0[1][:, :, None]
    return (Cs[:, :, :NL], ns[:, :, :NL], m_prev[..., :NL],
            (Cs[:, :, NL], ns[:, :, NL], m_prev[..., NL]))


def _rows(lf, ig, m, m_in, doc, L, scale):
    """The kernels' rows [B, H, R, Tp] (`mlstm_fwd.ROWS`) from [B, H, Tp] float32 rows (doc
    [B, Tp] or None) and m_in [B, H, NL]; the scale in a and w (the module docstring)."""
    B, H, Tp = lf.shape
    chunks = lambda x: x.reshape(x.shape[:-1] + (Tp // L, L))            # noqa: E731
    F = jnp.cumsum(chunks(lf), -1)
    w = scale * jnp.exp(F + m_in[..., None] - chunks(m))
    F = F.reshape(B, H, Tp)
    rows = [F - m + math.log(scale), None, -m, ig - F]
    if doc is not None:
        d = chunks(doc)
        d_in = jnp.concatenate([jnp.zeros_like(d[:, :1, :1]), d[:, :-1, -1:]], axis=1)
        w = jnp.where((d == d_in)[:, None], w, 0.0)
        rows.append(jnp.broadcast_to(doc[:, None], (B, H, Tp)))
    rows[1] = w.reshape(B, H, Tp)
    return jnp.stack(rows, axis=2)


def _intra_vjp(q, k, v, rows, Cin, nin, h, den, dh, *, L, eps, cfg):
    """The backward kernels' cotangents of (q, k, v, lf, ig, m, C_in, n_in, m_in) (rows
    [B, H, Tp] float32) from the forward's operands (`_rows`; C_in in v's dtype), h and den."""
    B, Tp, H, K = q.shape
    V, NT, NL = v.shape[-1], L // LANES, Tp // L
    dq, qrows, cross, dC, dn = grad_queries(q, k, v, dh, h, rows, den, Cin, nin, L=L,
                                            eps=eps, cfg=cfg)
    dk, dv, db = grad_keys(q, k, v, dh, rows, qrows, L=L, cfg=cfg)
    wdw = qrows[:, :, 1].reshape(B, H, NL, L)
    cross = cross.reshape(B, H, NL, NT, L).sum(3)                        # over query tiles
    dlf = cross + jnp.flip(jnp.cumsum(jnp.flip(wdw, -1), -1), -1)        # sum_{i >= s}
    return (dq, dk, dv, dlf.reshape(B, H, Tp), db[:, :, 0], qrows[:, :, 0],
            dC.reshape(B, H, NL, NT, K, V).sum(3), dn.reshape(B, H, NL, NT, K).sum(3),
            wdw.sum(-1))


def _heads_first(x):
    """[B, Tp, H] -> [B, H, Tp] (the kernels' rows)."""
    return jnp.moveaxis(x, 1, 2)


def _states_of(cfg: HopperMlstmConfig):
    """(k, v, ip, lf, h0, segment_ids, T, L) -> (C_in, n_in, m_in, (C, n, m)) by cfg.states
    ("auto": the matmul form up to `HopperMlstmConfig.MATMUL_CHUNKS` chunks, where its NL^2
    product was timed faster than the scan, the scan beyond)."""
    def states(k, v, *args):
        NL = k.shape[1] // args[-1]
        if cfg.states == "matmul" or (cfg.states == "auto" and NL <= cfg.MATMUL_CHUNKS):
            return _states_matmul(k, v, *args)
        S_in, m_in, state = _states(k, v, *args)
        return S_in[..., :-1], S_in[..., -1], m_in, state

    return states


@functools.cache
def _fused_core(cfg: HopperMlstmConfig, eps: float, scale: float, T: int):
    """custom_vjp of (q, k, v, lf, ip, m, h0, doc, seg) -> (h, C, n) for
    `HopperMlstmConfig.fused_forward`: padded q, k, v [B, Tp, H, *]; lf, ip, m [B, Tp, H] float32
    (ip: -1e30 on the padding; m: the token stabiliser, padded with its edge); h0 None or
    (C0, n0, m0); doc [B, Tp] float32 and seg (the op's segment ids) None or given. The forward
    is one kernel (`mlstm_fused`); under differentiation it also writes the chunk states C_in,
    n_in and den, the backward runs the unfused backward kernels on them (`_intra_vjp`) and
    XLA's VJP of the chunk states (`_states_of(cfg)`, as the unfused path: only their
    linearisation is needed, the products forming C_in are left unused) for the rest."""
    L = cfg.chunk
    states_fn = _states_of(cfg)
    hm = _heads_first

    def run(q, k, v, lf, ip, m, h0, doc, residuals):
        B, Tp, H, K = q.shape
        m0 = jnp.zeros((B, H), f32) if h0 is None else h0[2]
        rows = tile_rows(hm(lf), hm(ip), hm(m), m0, doc, scale)
        h0k = None if h0 is None else (h0[0], h0[1].reshape(B, H, K // LANES, LANES))
        return fused_forward(q, k, v, rows, h0k, L=L, eps=eps, cfg=cfg, residuals=residuals)

    def forward(q, k, v, lf, ip, m, h0, doc, seg):
        h, Cf, nf = run(q, k, v, lf, ip, m, h0, doc, False)
        return h, Cf, nf.reshape(Cf.shape[:3])

    def fwd(q, k, v, lf, ip, m, h0, doc, seg):
        h, Cf, nf, Cin, nin, den = run(q, k, v, lf, ip, m, h0, doc, True)
        return (h, Cf, nf.reshape(Cf.shape[:3])), (q, k, v, lf, ip, m, h0, doc, seg, h, Cin,
                                                   nin.reshape(nin.shape[:3] + (-1,)), den)

    def bwd(res, cts):
        q, k, v, lf, ip, m, h0, doc, seg, h, Cin, nin, den = res
        dh, dCf, dnf = cts
        (_, _, m_in, (_, _, mf)), vjp = jax.vjp(
            lambda k, v, ip, lf, h0: states_fn(k, v, ip, lf, h0, seg, T, L), k, v, ip, lf, h0)
        rows = _rows(hm(lf), hm(ip), hm(m), m_in, doc, L, scale)
        dq, dk, dv, dlf, dip, dm, dC, dn, dm_in = _intra_vjp(q, k, v, rows, Cin, nin, h, den, dh,
                                                             L=L, eps=eps, cfg=cfg)
        dk2, dv2, dip2, dlf2, dh0 = vjp((dC, dn, dm_in, (dCf, dnf, jnp.zeros_like(mf))))
        return (dq, dk + dk2.astype(dk.dtype), dv + dv2.astype(dv.dtype), hm(dlf) + dlf2,
                hm(dip) + dip2, hm(dm), dh0, None, None)

    f = jax.custom_vjp(forward)
    f.defvjp(fwd, bwd)
    return f


@functools.cache
def _core(cfg: HopperMlstmConfig, eps: float, scale: float):
    """custom_vjp of (q, k, v, lf, ig, m, C_in, n_in, m_in, doc) -> h over the padded inputs: q
    unscaled, rows [B, H, Tp] float32 (doc [B, Tp] float32 or None), the entering states C_in
    [B, H, NL, K, V], n_in [B, H, NL, K] and m_in [B, H, NL] float32."""
    L = cfg.chunk

    def operands(q, k, v, lf, ig, m, C_in, n_in, m_in, doc):
        return (q, k, v, _rows(lf, ig, m, m_in, doc, L, scale), C_in.astype(v.dtype), n_in)

    def forward(*args):
        return out_kernel(*operands(*args), L=L, eps=eps, cfg=cfg, save=False)

    def fwd(*args):
        ops_ = operands(*args)
        h, den = out_kernel(*ops_, L=L, eps=eps, cfg=cfg, save=True)
        return h, (ops_, h, den)

    def bwd(res, dh):
        (q, k, v, rows, Cin, nin), h, den = res
        return _intra_vjp(q, k, v, rows, Cin, nin, h, den, dh, L=L, eps=eps, cfg=cfg) + (None,)

    f = jax.custom_vjp(forward)
    f.defvjp(fwd, bwd)
    return f


def mlstm(q, k, v, i, f, *, scale, initial_state, segment_ids, chunk_size, eps, config=None):
    """The op's kernel signature. q, k [B, T, H, K] (heads expanded), v [B, T, H, V] bf16 / fp16,
    i, f [B, T, H]; initial_state None or (C, n, m); segment_ids None or int [B, T]; chunk_size
    is ignored (the config's chunk L is the kernel's). Returns (h [B, T, H, V] in v's dtype,
    (C, n, m) float32)."""
    cfg = config or HopperMlstmConfig()
    reason = accepts(q, k, v)
    if reason is not None:
        raise ValueError(f"mlstm: {reason}")
    B, T, H, _ = q.shape
    h0 = None if initial_state is None else tuple(x.astype(f32) for x in initial_state)
    m0 = jnp.zeros((B, H), f32) if h0 is None else h0[2]
    ig, lf = i.astype(f32), jax.nn.log_sigmoid(f.astype(f32))
    m = running_max(ig, lf, m0, segment_ids)
    if cfg.form == "simple_gla":
        return mlstm_gla.mlstm(q, k, v, ig, lf, m, h0, scale=scale, segment_ids=segment_ids,
                               eps=eps, cfg=cfg)
    L = cfg.chunk
    Tp = -(-T // L) * L
    pad = lambda x, mode="constant": pad_time(x, Tp, mode=mode)           # noqa: E731
    ip = jnp.where(jnp.arange(Tp)[None, :, None] < T, pad(ig), -1e30)    # padding adds nothing
    doc = None if segment_ids is None else padded_doc(segment_ids, Tp).astype(f32)
    if cfg.fused_forward:
        h, C, n = _fused_core(cfg, float(eps), float(scale), T)(
            pad(q), pad(k), pad(v), pad(lf), ip, pad(m, "edge"), h0, doc, segment_ids)
        return h[:, :T].astype(v.dtype), (C, n, m[:, T - 1])
    C_in, n_in, m_in, state = _states_of(cfg)(pad(k), pad(v), ip, pad(lf), h0, segment_ids, T,
                                              L)
    hm = _heads_first
    h = _core(cfg, float(eps), float(scale))(pad(q), pad(k), pad(v), hm(pad(lf)), hm(ip),
                                             hm(pad(m, "edge")), C_in, n_in, m_in, doc)
    return h[:, :T].astype(v.dtype), state
