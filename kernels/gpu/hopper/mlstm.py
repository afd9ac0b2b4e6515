"""Chunkwise mLSTM (xLSTM's matrix memory; `linear_jax.ops.mlstm` states the math) on Hopper: a
Mosaic GPU kernel for the intra-chunk output with the stabiliser and normaliser inside, TFLA's
two-level tiling (Beck et al. 2025): chunks of L = 128 or 256 tokens between stored states,
tiles of 64 queries x 64 keys inside the kernel, so a chunk never has to fit SMEM at once.

With l = logsigmoid(f), per chunk of L tokens F_i = sum_{s <= i} l_s (chunk-local), the chunk's
entering state (C_in, n_in, m_in) and, for query row i and key column j <= i of the chunk,

    log D_ij = F_i - F_j + i_j,     enter_i = F_i + m_in
    m_i      = max(enter_i, max_{j <= i} log D_ij) = max(enter_i, F_i + cummax_{j <= i}(i_j - F_j))
    num_i    = sum_j (q_i . k_j) exp(log D_ij - m_i) v_j + exp(enter_i - m_i) q_i C_in
    den_i    = sum_j (q_i . k_j) exp(log D_ij - m_i)     + exp(enter_i - m_i) q_i . n_in
    h_i      = num_i / (max(|den_i|, exp(-m_i)) + eps)

m_i is the recurrent m_t itself (the same row max as the XLA chunk form): because the row max
of the gate matrix is a prefix max of gate values only, it is formed before any matmul (one
`lax.cummax` in XLA) and the kernel needs no online rescaling across key tiles; every exponent is
<= 0. The chunk states (C_in, n_in, m_in) come from the float32 chunk recurrence in XLA (the
state update is a [K, L] x [L, V] matmul per chunk, which XLA runs on the tensor cores; the scan
over T / L chunks is short).

Kernel: grid (B, H, T / 64): one warpgroup per 64 query rows; TMA brings the q tile, the key and
value tiles of its chunk (L / 64 of each) and the chunk's C_in (bf16, [K, V]); per key tile
q k^T (wgmma), the gate factor exp(min(F_i - m_i + (i_j - F_j), 0)) on the causal pairs, P v
(wgmma, P from registers) and the row sums of P; then q C_in (wgmma) and q . n_in scaled by
exp(enter_i - m_i); h normalised and written by TMA. Key tiles after the query tile are masked
(P = 0), not skipped: at L = 128 that is a quarter of the intra work wasted, the price of a
static loop (to remove on the device).

Backward: the XLA chunk form's VJP (`linear_jax.ops.mlstm.mlstm_chunk`, recomputed) — no
Hopper backward kernel yet.

Roofline at B = 8, T = 2048, H = 16, K = V = 128, bf16 (H200 ~4.3 TB/s, ~790 TFLOP/s):
  bytes  q, k, v in, h out (4 x 67 MB), key / value tiles re-read per query tile (L / 64 = 2:
         +134 MB, from L2 mostly), chunk states (B H T / L K V 2 B = 67 MB at L = 128)  ~470 MB
         0.11 ms;  FLOPs 2 B H T (L (K + V) + 2 K V) ~ 35 GFLOP (intra at L = 128 plus the
         state read and write), ~0.05 ms: bandwidth-bound, like the scalar-gate chunk forward.

Inputs bf16 / fp16; K = V = 64 or 128; no segment ids (ValueError: impl="pallas:triton" takes
them); T padded to a multiple of L.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax._compat import mosaic_gpu_kernel
from linear_jax.kernels.configs import HopperMlstmConfig
from linear_jax.kernels.gpu.hopper.common import (
    LANES,
    Ops,
    check_smem,
    f32,
    interpreting,
    pl,
    plgpu,
    prod,
    smem,
)
from linear_jax.ops.common.chunking import pad_time
from linear_jax.ops.common.gates import rev_cumsum_excl
from linear_jax.ops.common.normalise import MAX_LOG_FLOOR

# the per-token rows the kernel reads: F - m (query rows), i - F (key columns), exp(enter - m), -m
ROWS = ("a", "b", "w", "negm")


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


def _out_kernel(q, k, v, rows, Cin, nin, *, L, eps, cfg):
    """q, k [B, Tp, H, K], v [B, Tp, H, V] (bf16); rows [B, H, 4, Tp] f32 (ROWS); Cin
    [B, H, Tp / L, K, V] bf16; nin [B, H, Tp / L, K] f32. Returns h [B, Tp, H, V] in v's dtype."""
    B, Tp, H, K = q.shape
    V, dt = v.shape[-1], v.dtype
    C = LANES
    NQ, NT = Tp // C, L // C
    ops = Ops(interpreting(cfg))
    shape = (C, V)

    def body(q_ref, k_ref, v_ref, r_ref, c_ref, n_ref, h_ref, qs, *refs):
        # one SMEM ref per key / value tile (a static index into a stacked swizzled ref does
        # not lower under the warpgroup semantics of jax 0.10)
        ks, vs = refs[:NT], refs[NT:2 * NT]
        rs, kr, cs, ns, hs, bar = refs[2 * NT:]
        b, h, t = (lax.axis_index(a) for a in ("b", "h", "t"))
        chunk = lax.div(t, NT)
        first = chunk * NT
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t * C, C), h], qs, bar.at[0])
        plgpu.copy_gmem_to_smem(r_ref.at[b, h, :, pl.ds(t * C, C)], rs, bar.at[0])
        for j in range(NT):
            tk = pl.ds((first + j) * C, C)
            plgpu.copy_gmem_to_smem(k_ref.at[b, tk, h], ks[j], bar.at[0])
            plgpu.copy_gmem_to_smem(v_ref.at[b, tk, h], vs[j], bar.at[0])
            plgpu.copy_gmem_to_smem(r_ref.at[b, h, 1, tk], kr.at[j], bar.at[0])
        plgpu.copy_gmem_to_smem(c_ref.at[b, h, chunk], cs, bar.at[0])
        plgpu.copy_gmem_to_smem(n_ref.at[b, h, pl.ds(chunk, 1)], ns, bar.at[0])
        plgpu.barrier_wait(bar.at[0])

        a = ops.row(rs.at[0][...])                 # F_i - m_i
        w = ops.row(rs.at[2][...])                 # exp(enter_i - m_i)
        r = ops.iota((C, C), 0) + t * C
        c0 = ops.iota((C, C), 1)
        (inter,) = ops.mm(prod(qs, cs))
        qf = ops.acc(qs[...]).astype(f32)
        nq = jnp.sum(qf * ops.cols_of(ops.col(ns.at[0][...]), (C, K)), axis=1)
        num = inter * ops.rows_of(w, shape)
        den = w * nq
        for j in range(NT):
            (S,) = ops.mm(prod(qs, ks[j], tb=True))
            bj = ops.col(kr.at[j][...])
            expo = jnp.minimum(ops.rows_of(a, (C, C)) + ops.cols_of(bj, (C, C)), 0.0)
            P = jnp.where(c0 + (first + j) * C <= r, S * jnp.exp(expo), 0.0)
            den = den + jnp.sum(P, axis=1)
            (pv,) = ops.mm(prod(P.astype(dt), vs[j]))
            num = num + pv
        floor = jnp.exp(jnp.minimum(ops.row(rs.at[3][...]), MAX_LOG_FLOOR))   # exp(-m_i)
        hv = num / ops.rows_of(jnp.maximum(jnp.abs(den), floor) + eps, shape)
        hs[...] = hv.astype(dt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hs, h_ref.at[b, pl.ds(t * C, C), h])
        plgpu.wait_smem_to_gmem(0)

    scratch = [smem((C, K), dt)] + [smem((C, K), dt) for _ in range(NT)]
    scratch += [smem((C, V), dt) for _ in range(NT)]
    scratch += [plgpu.SMEM((4, C), f32), plgpu.SMEM((NT, C), f32), smem((K, V), dt),
                plgpu.SMEM((1, K), f32), smem((C, V), dt),
                plgpu.Barrier(num_arrivals=4 + 3 * NT, num_barriers=1)]
    check_smem("mlstm_out", scratch)
    kernel = mosaic_gpu_kernel(
        body, out_type=jax.ShapeDtypeStruct((B, Tp, H, V), dt), grid=(B, H, NQ),
        grid_names=("b", "h", "t"), num_threads=1, thread_name="wg", scratch_types=scratch,
        semantics=cfg.semantics, approx_math=cfg.approx_math, interpret=ops.interpret,
        name="mlstm_out")
    return kernel(q, k, v, rows, Cin, nin)


def _states(q, k, v, i, lf, h0, L):
    """The chunk recurrence in float32 (XLA): per chunk the entering (C_in [B, H, NL, K, V],
    n_in [B, H, NL, K], m_in [B, H, NL]), the final state, and the rows F, i - F [B, H, NL, L]."""
    B, Tp, H, K = k.shape
    V = v.shape[-1]
    NL = Tp // L
    hm = lambda x: jnp.moveaxis(x, 2, 1)                                   # noqa: E731
    ic = hm(i).reshape(B, H, NL, L)
    lc = hm(lf).reshape(B, H, NL, L)
    kc = hm(k).reshape(B, H, NL, L, K).astype(f32)
    vc = hm(v).reshape(B, H, NL, L, V).astype(f32)
    vc = jnp.concatenate([vc, jnp.ones(vc.shape[:-1] + (1,), f32)], -1)
    F = jnp.cumsum(lc, -1)
    wr = rev_cumsum_excl(lc, 3) + ic                       # what each token writes, log
    wmax = jnp.max(wr, -1)
    dS = jnp.einsum("bhnck,bhncv->bhnkv", kc * jnp.exp(wr - wmax[..., None])[..., None], vc,
                    preferred_element_type=f32)
    if h0 is None:
        S0, m0 = jnp.zeros((B, H, K, V + 1), f32), jnp.zeros((B, H), f32)
    else:
        C0, n0, m0 = (x.astype(f32) for x in h0)
        S0 = jnp.concatenate([C0, n0[..., None]], -1)

    def step(carry, x):
        S, m = carry
        dS_n, a_n, g_n = x
        m_new = jnp.maximum(g_n + m, a_n)
        S_new = jnp.exp(g_n + m - m_new)[..., None, None] * S + \
            jnp.exp(a_n - m_new)[..., None, None] * dS_n
        return (S_new, m_new), (S, m)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (dS, wmax, F[..., -1]))
    (S_fin, m_fin), (S_in, m_in) = lax.scan(step, (S0, m0), xs)
    S_in, m_in = jnp.moveaxis(S_in, 0, 2), jnp.moveaxis(m_in, 0, 2)
    return S_in, m_in, (S_fin[..., :V], S_fin[..., V], m_fin), F, ic - F


@functools.cache
def _core(cfg: HopperMlstmConfig, scale: float, eps: float, has_h0: bool, T: int):
    L = cfg.chunk

    def forward(q, k, v, i, f, h0):
        B, _, H, _ = q.shape
        V = v.shape[-1]
        Tp = -(-T // L) * L
        qs = (q.astype(f32) * scale).astype(q.dtype)
        pad = lambda x: pad_time(x, Tp)                                    # noqa: E731
        lf = jax.nn.log_sigmoid(f.astype(f32))
        ip = jnp.where(jnp.arange(Tp)[None, :, None] < T, pad(i.astype(f32)), -1e30)
        S_in, m_in, state, F, iF = _states(pad(qs), pad(k), pad(v), ip, pad(lf), h0, L)
        enter = F + m_in[..., None]
        m = jnp.maximum(enter, F + lax.cummax(iF, axis=3))
        rows = jnp.stack([F - m, iF, jnp.exp(enter - m), -m], axis=2)      # [B, H, 4, NL, L]
        rows = rows.reshape(B, H, 4, Tp)
        Cin = S_in[..., :V].astype(v.dtype)
        nin = S_in[..., V]
        h = _out_kernel(pad(qs), pad(k), pad(v), rows, Cin, nin, L=L, eps=eps, cfg=cfg)
        return h[:, :T], state

    def reference(q, k, v, i, f, h0):
        from linear_jax.ops.mlstm import mlstm_chunk
        return mlstm_chunk(q, k, v, i, f, scale=scale, initial_state=h0, segment_ids=None,
                           chunk_size=64, eps=eps)

    def fwd(q, k, v, i, f, h0):
        return forward(q, k, v, i, f, h0), (q, k, v, i, f, h0)

    def bwd(res, cts):
        dh, dstate = cts
        _, vjp = jax.vjp(reference, *res)
        grads = vjp((dh.astype(f32), dstate))
        return tuple(jax.tree.map(lambda g, x: g.astype(x.dtype), g, x) if x is not None
                     else None for g, x in zip(grads, res, strict=True))

    f = jax.custom_vjp(forward)
    f.defvjp(fwd, bwd)
    return f


def mlstm(q, k, v, i, f, *, scale, initial_state, segment_ids, chunk_size, eps, config=None):
    """The op's kernel signature. q, k [B, T, H, K] (heads expanded), v [B, T, H, V] bf16 / fp16,
    i, f [B, T, H]; initial_state None or (C, n, m); segment_ids must be None (ValueError);
    chunk_size is ignored (the config's chunk L is the kernel's). Returns (h [B, T, H, V] in v's
    dtype, (C, n, m) float32)."""
    cfg = config or HopperMlstmConfig()
    reason = accepts(q, k, v)
    if reason is not None:
        raise ValueError(f"mlstm: {reason}")
    if segment_ids is not None:
        raise ValueError("mlstm: the Mosaic GPU kernel does not take segment_ids yet; use "
                         "impl='pallas:triton' or impl='chunk'")
    T = q.shape[1]
    core = _core(cfg, float(scale), float(eps), initial_state is not None, T)
    h, state = core(q, k, v, i, f, None if initial_state is None else tuple(initial_state))
    return h.astype(v.dtype), state
