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
(`running_max`). The kernels take m and m_prev (m_{t-1}; m_0's predecessor is the initial m) as
inputs, so m_in and m_out are m_prev of the chunk's first row and m of its last; every exponent
above is then <= 0 (up to rounding) whatever the gates, as in TFLA. Their backward returns dm and
dm_prev as plain partial derivatives, and XLA's autodiff of the scan routes them through the max.
The normalisation (eps, the floor) also runs in XLA on the kernels' (o, z).

Kernels: the state pass (`_state_pass`, grid (B*H, V/BV), writes every chunk's entering [C | n]),
the parallel output kernel (`_output`, grid (B*H, N, V/BV)); backward (`jax.custom_vjp`): the
reverse state pass (the same kernel: dS_n = alpha dS_{n+1} + sum_i w_i q_i [do_i, dz_i]), then one
parallel kernel per chunk (`_grads`) for dq, dk, dv, di, dl, dm, dm_prev, with Z = dP * P,
y_i = w_i q_i . (C_in do_i + n_in dz_i), sigma_j = beta_j k_j . (dC_out v_j + dn_out) and
rho = alpha <S_in, dS_out>:

    dm_i = -sum_j Z_ij - y_i,      dm_in += sum_i y_i + rho,      dm_out -= rho + sum_j sigma_j
    di_j = sum_i Z_ij + sigma_j
    dl_s = sum_{i>=s, j<s} Z_ij + sum_{i>=s} y_i + rho [s in the last document] + sum_{j<s} sigma_j

Every span of gates is summed from exactly the gates inside it (D as a product of 0/1 masks with
l, no difference of cumulative sums), and so are the gate gradients. Padding: T to a multiple of C
(padded rows add no state, their outputs are dropped), K to a power of two, V to a multiple of 16.
bf16/fp16 inputs run dot operands in their dtype with float32 accumulation; float32 inputs run IEEE
float32 dots; states, gates and m are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import common
from linear_jax.kernels.gpu.triton import dot, interpret, triton_params
from linear_jax.ops.common.chunking import doc_index, pad_time, resets
from linear_jax.ops.common.normalise import normalise

f32 = jnp.float32


def running_max(i, l, m0, segment_ids):
    """m_t = max(l_t + m_{t-1}, i_t), m_{-1} = m0, restarting from 0 at a reset; [B, T, H].

    Step t is the map x -> max(x + a_t, b_t) and maps compose as (a1, b1) then (a2, b2) =
    (a1 + a2, max(b1 + a2, b2)), so a prefix scan of the pairs gives every m_t. A reset forgets x:
    a = -inf, b = max(l_t, i_t) (the zero state's candidate 0 + l_t)."""
    a, b = l, i
    if segment_ids is not None:
        r = resets(segment_ids)[..., None]
        a, b = jnp.where(r, -jnp.inf, l), jnp.where(r, jnp.maximum(l, i), i)
    combine = lambda x, y: (x[0] + y[0], jnp.maximum(x[1] + y[0], y[1]))
    A, Bm = lax.associative_scan(combine, (a, b), axis=1)
    return jnp.maximum(m0[:, None, :] + A, Bm)


def _terms(refs, n, C, T, pairs):
    """The chunk-n factors of the module docstring from the whole-T refs (i, l, m, m_prev, doc).

    Returns a dict: alpha (scalar); beta, w, out_rows [C]; with `pairs` also E [C, C]."""
    i_ref, l_ref, m_ref, mp_ref, doc_ref = refs
    rows = pl.ds(n * C, C)
    ig, l, m = i_ref[rows], l_ref[rows], m_ref[rows]
    m_in, m_out = mp_ref[n * C], m_ref[n * C + C - 1]
    in_rows, out_rows, keep, same = common.chunk_masks(doc_ref, n, C, True)
    idx = jnp.arange(C, dtype=jnp.int32)
    r, c = idx[:, None], idx[None, :]
    real = n * C + idx < T                       # padded rows add no candidate and no state
    masked_exp = lambda ok, x: jnp.exp(jnp.where(ok, x, -jnp.inf))
    span_in = jnp.sum(jnp.where(c <= r, l[None, :], 0.0), axis=1)          # sum_{s<=i} l_s
    R = jnp.sum(jnp.where(c > r, l[None, :], 0.0), axis=1)                  # sum_{s>j} l_s
    g = jnp.sum(jnp.where(out_rows, l, 0.0))
    out = dict(alpha=masked_exp(keep, g + m_in - m_out),
               beta=masked_exp(out_rows & real, R + ig - m_out),
               w=masked_exp(in_rows, span_in + m_in - m), out_rows=out_rows)
    if pairs:
        # D_ij = sum_s [j < s <= i] l_s: a 0/1 matrix times the masked gates, exact in float32
        D = dot(common.causal(C).astype(f32), jnp.where(r > c, l[:, None], 0.0), exact=True)
        ok = common.causal(C) & same & real[None, :]
        out["E"] = masked_exp(ok, D + ig[None, :] - m[:, None])
    return out


def _gate_specs(H, Tp):
    return [common.spec(H, Tp)] * 4 + [common.doc_spec(H, Tp)]


def _state_pass(x, y, y1, gates, S0, s0, *, cfg, T, reverse, scale):
    """Forward (x = k, y = v, y1 None: the normaliser's column of ones):
        S_{n+1} = alpha S_n + sum_j beta_j k_j [v_j, 1].
    Reverse (x = q, y = do, y1 = dz):
        dS_n = alpha dS_{n+1} + sum_i w_i scale q_i [do_i, dz_i].
    Writes the state on one side of every chunk (forward: entering; reverse: leaving) and the end
    state: ([B,H,N,Kp,Vp], [B,H,N,Kp], [B,H,Kp,Vp], [B,H,Kp]) float32."""
    B, Tp, H, Kp = x.shape
    Vp, C = y.shape[-1], cfg.chunk
    N = Tp // C
    _, BV = common.state_tiles(B * H, Kp, Vp, cfg, split_k=False)
    exact = x.dtype == f32

    def kernel(x_ref, y_ref, *refs):
        y1_ref, refs = (refs[0], refs[1:]) if reverse else (None, refs)
        gate_refs, (S0_ref, s0_ref, hs_ref, ns_ref, S_ref, s_ref) = refs[:5], refs[5:]
        first = pl.program_id(1) == 0              # the V tile that writes the normaliser

        def step(it, carry):
            S, s = carry
            n = N - 1 - it if reverse else it
            hs_ref[n] = S

            @pl.when(first)
            def _():
                ns_ref[n] = s

            t = _terms(gate_refs, n, C, T, pairs=False)
            xn = x_ref[pl.ds(n * C, C), :].astype(f32)
            xn = xn * (t["w"] * scale)[:, None] if reverse else xn * t["beta"][:, None]
            yn = y_ref[pl.ds(n * C, C), :].astype(x.dtype)
            S = t["alpha"] * S + dot(xn.astype(x.dtype), yn, ta=True, exact=exact)
            col = xn * y1_ref[pl.ds(n * C, C)][:, None] if reverse else xn
            return S, t["alpha"] * s + jnp.sum(col, axis=0)

        S, s = lax.fori_loop(0, N, step, (S0_ref[...], s0_ref[...]))
        S_ref[...] = S

        @pl.when(first)
        def _():
            s_ref[...] = s

    vec = pl.BlockSpec((None, None, Kp), lambda bh, j: (bh // H, bh % H, 0))
    vecs = pl.BlockSpec((None, None, N, Kp), lambda bh, j: (bh // H, bh % H, 0, 0))
    ones = [] if y1 is None else [y1]
    return pl.pallas_call(
        kernel,
        grid=(B * H, Vp // BV),
        in_specs=[common.spec(H, Tp, Kp), common.spec(H, Tp, BV, x=0),
                  *[common.spec(H, Tp)] * len(ones), *_gate_specs(H, Tp),
                  common.state_spec(H, Kp, BV, v=0), vec],
        out_specs=[common.states_spec(H, N, Kp, BV, v=0), vecs, common.state_spec(H, Kp, BV, v=0),
                   vec],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, Kp, Vp), f32),
                   jax.ShapeDtypeStruct((B, H, N, Kp), f32),
                   jax.ShapeDtypeStruct((B, H, Kp, Vp), f32),
                   jax.ShapeDtypeStruct((B, H, Kp), f32)],
        compiler_params=triton_params(cfg, cfg.warps_state, cfg.stages_state),
        interpret=interpret(cfg),
        name="mlstm_state_bwd" if reverse else "mlstm_state_fwd",
    )(x, y, *ones, *gates, S0, s0)


def _chunk_vec(H, Kp):
    """[B, H, N, Kp] per-chunk normaliser states: chunk n's row."""
    return pl.BlockSpec((None, None, None, Kp), lambda bh, n, *g: (bh // H, bh % H, n, 0))


def _output(q, k, v, gates, hs, ns, *, cfg, T, scale):
    """(o [B, Tp, H, Vp], z [B, Tp, H]) float32: the unnormalised output and normaliser."""
    B, Tp, H, Kp = q.shape
    Vp, C = v.shape[-1], cfg.chunk
    N, BV = Tp // C, common.value_block(Vp, cfg.block_v_out)
    exact = q.dtype == f32

    def kernel(q_ref, k_ref, v_ref, *refs):
        gate_refs, (h_ref, n_ref, o_ref, z_ref) = refs[:5], refs[5:]
        t = _terms(gate_refs, pl.program_id(1), C, T, pairs=True)
        q, w = q_ref[...], t["w"]
        P = dot(q, k_ref[...], tb=True, exact=exact) * scale * t["E"]
        qs = q.astype(f32) * scale
        o = dot(P.astype(q.dtype), v_ref[...], exact=exact) + w[:, None] * dot(
            qs.astype(q.dtype), h_ref[...].astype(q.dtype), exact=exact)
        o_ref[...] = o

        @pl.when(pl.program_id(2) == 0)
        def _():
            z_ref[...] = jnp.sum(P, axis=1) + w * jnp.sum(qs * n_ref[...][None, :], axis=1)

    return pl.pallas_call(
        kernel,
        grid=(B * H, N, Vp // BV),
        in_specs=[common.spec(H, C, Kp, t=0), common.spec(H, C, Kp, t=0),
                  common.spec(H, C, BV, t=0, x=1), *_gate_specs(H, Tp),
                  common.states_spec(H, N, Kp, BV, n=0, v=1), _chunk_vec(H, Kp)],
        out_specs=[common.spec(H, C, BV, t=0, x=1), common.spec(H, C, t=0)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Vp), f32),
                   jax.ShapeDtypeStruct((B, Tp, H), f32)],
        compiler_params=triton_params(cfg, cfg.warps_out, cfg.stages_out),
        interpret=interpret(cfg), name="mlstm_output",
    )(q, k, v, *gates, hs, ns)


def _grads(q, k, v, gates, hs, ns, dhs, dns, do, dz, *, cfg, T, scale):
    """dq, dk, dv (input dtypes) and di, dl, dm, dm_prev [B, Tp, H] float32 (module docstring)."""
    B, Tp, H, Kp = q.shape
    Vp, C = v.shape[-1], cfg.chunk
    N, BV = Tp // C, common.value_block(Vp, cfg.block_v_out)
    exact, cd = q.dtype == f32, q.dtype

    def kernel(q_ref, k_ref, v_ref, *refs):
        gate_refs, refs = refs[:5], refs[5:]
        h_ref, n_ref, dh_ref, dn_ref, do_ref, dz_ref = refs[:6]
        dq_ref, dk_ref, dv_ref, di_ref, dl_ref, dm_ref, dmp_ref = refs[6:]
        t = _terms(gate_refs, pl.program_id(1), C, T, pairs=True)
        E, w, beta, alpha = t["E"], t["w"], t["beta"], t["alpha"]
        q, k = q_ref[...], k_ref[...]
        qs = q.astype(f32) * scale
        P = dot(q, k, tb=True, exact=exact) * scale * E
        kb = (k.astype(f32) * beta[:, None]).astype(cd)
        dz = dz_ref[...]
        dP = jnp.broadcast_to(dz[:, None], (C, C))
        dq_in = dz[:, None] * n_ref[...][None, :]          # C_in do_i + n_in dz_i, rows i
        dk_out = jnp.broadcast_to(dn_ref[...][None, :], (C, Kp))   # dC_out v_j + dn_out
        rho = jnp.sum(n_ref[...] * dn_ref[...])
        for b in range(Vp // BV):
            cols = pl.ds(b * BV, BV)
            v_b, do_b, h_b, dh_b = v_ref[:, cols], do_ref[:, cols], h_ref[:, cols], dh_ref[:, cols]
            dP += dot(do_b.astype(cd), v_b, tb=True, exact=exact)
            dq_in += dot(do_b.astype(cd), h_b.astype(cd), tb=True, exact=exact)
            dk_out += dot(v_b, dh_b.astype(cd), tb=True, exact=exact)
            rho += jnp.sum(h_b * dh_b)
            dv = (dot(P.astype(cd), do_b.astype(cd), ta=True, exact=exact)
                  + dot(kb, dh_b.astype(cd), exact=exact))
            dv_ref[:, cols] = dv.astype(dv_ref.dtype)
        rho = alpha * rho
        y = w * jnp.sum(qs * dq_in, axis=1)
        sigma = beta * jnp.sum(k.astype(f32) * dk_out, axis=1)
        Z = dP * P
        dPE = (dP * E).astype(cd)
        dq_ref[...] = ((dot(dPE, k, exact=exact) + w[:, None] * dq_in) * scale).astype(
            dq_ref.dtype)
        dk_ref[...] = (dot(dPE, q, ta=True, exact=exact) * scale
                       + beta[:, None] * dk_out).astype(dk_ref.dtype)
        idx = jnp.arange(C, dtype=jnp.int32)
        r, c = idx[:, None], idx[None, :]
        # sum_{i>=s} Z_ij for every (s, j): the transposed 0/1 causal mask times Z
        UZ = dot((r <= c).astype(f32), Z, exact=True)
        last = idx == C - 1
        di_ref[...] = jnp.sum(Z, axis=0) + sigma
        dl_ref[...] = (jnp.sum(jnp.where(c < r, UZ, 0.0), axis=1)
                       + jnp.sum(jnp.where(c >= r, y[None, :], 0.0), axis=1)
                       + jnp.where(t["out_rows"], rho, 0.0)
                       + jnp.sum(jnp.where(c < r, sigma[None, :], 0.0), axis=1))
        dm_ref[...] = (-jnp.sum(Z, axis=1) - y
                       - jnp.where(last, rho + jnp.sum(sigma), 0.0))
        dmp_ref[...] = jnp.where(idx == 0, jnp.sum(y) + rho, 0.0)

    rows = lambda X: common.spec(H, C, X, t=0)
    state = common.states_spec(H, N, Kp, Vp, n=0)
    scalar = common.spec(H, C, t=0)
    shp = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    sc = jax.ShapeDtypeStruct((B, Tp, H), f32)
    return pl.pallas_call(
        kernel,
        grid=(B * H, N),
        in_specs=[rows(Kp), rows(Kp), rows(Vp), *_gate_specs(H, Tp), state, _chunk_vec(H, Kp),
                  state, _chunk_vec(H, Kp), rows(Vp), scalar],
        out_specs=[rows(Kp), rows(Kp), rows(Vp)] + [scalar] * 4,
        out_shape=[shp(q), shp(k), shp(v), sc, sc, sc, sc],
        compiler_params=triton_params(cfg, cfg.warps_bwd, cfg.stages_bwd),
        interpret=interpret(cfg), name="mlstm_backward",
    )(q, k, v, *gates, hs, ns, dhs, dns, do, dz)


@functools.cache
def _core(cfg, T, scale):
    """custom_vjp of the padded (q, k, v, i, l, m, m_prev, doc, C0, n0) -> (o, z, C_T, n_T)."""
    kw = dict(cfg=cfg, T=T, scale=scale)

    def fwd(q, k, v, i, l, m, mp, doc, C0, n0):
        gates = (i, l, m, mp, doc)
        hs, ns, CT, nT = _state_pass(k, v, None, gates, C0, n0, reverse=False, **kw)
        o, z = _output(q, k, v, gates, hs, ns, **kw)
        return (o, z, CT, nT), (q, k, v, gates, hs, ns)

    def bwd(res, cts):
        q, k, v, gates, hs, ns = res
        do, dz, dCT, dnT = cts
        dhs, dns, dC0, dn0 = _state_pass(q, do, dz, gates, dCT, dnT, reverse=True, **kw)
        dq, dk, dv, di, dl, dm, dmp = _grads(q, k, v, gates, hs, ns, dhs, dns, do, dz, **kw)
        return dq, dk, dv, di, dl, dm, dmp, None, dC0, dn0

    f = jax.custom_vjp(lambda *a: fwd(*a)[0])
    f.defvjp(fwd, bwd)
    return f


def mlstm(q, k, v, i, f, *, scale, initial_state, segment_ids, chunk_size, eps, config=None):
    """The op's chunk-impl signature (heads expanded): returns (h [B, T, H, V] in v's dtype,
    (C [B, H, K, V], n [B, H, K], m [B, H]) float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = (config or TritonChunkConfig.default()).for_chunk(chunk_size)
    C = cfg.chunk
    Tp, Kp, Vp, pad = common.padded_inputs(q, k, v, C)
    if initial_state is None:
        C0, n0, m0 = (jnp.zeros(s, f32) for s in ((B, H, K, V), (B, H, K), (B, H)))
    else:
        C0, n0, m0 = (s.astype(f32) for s in initial_state)
    ig, l = i.astype(f32), jax.nn.log_sigmoid(f.astype(f32))
    m = running_max(ig, l, m0, segment_ids)
    mp = jnp.concatenate([m0[:, None], m[:, :-1]], axis=1)
    doc = (doc_index(segment_ids) if segment_ids is not None else jnp.zeros((B, T), jnp.int32))
    edge = lambda x: pad_time(x, Tp, mode="edge")
    o, z, CT, nT = _core(cfg, T, float(scale))(
        pad(q, Kp), pad(k, Kp), pad(v, Vp), pad_time(ig, Tp), pad_time(l, Tp), edge(m), edge(mp),
        edge(doc.astype(jnp.int32)),
        jnp.pad(C0, ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V))),
        jnp.pad(n0, ((0, 0), (0, 0), (0, Kp - K))))
    h = normalise(o[:, :T, :, :V], z[:, :T], m, eps)
    return h.astype(v.dtype), (CT[:, :, :K, :V], nT[:, :, :K], m[:, -1])
