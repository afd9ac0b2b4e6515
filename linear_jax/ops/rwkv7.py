"""RWKV-7 "Goose": the generalised delta rule, a diagonal-plus-rank-one transition.

    S_t = (diag(exp(g_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution". The paper writes the
state as wkv [V, K] acting on row vectors, wkv_t = wkv_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,
read as o_t = wkv_t r_t; our S = wkv^T [K, V], so the transition acts on the left and its rank-one
part is b a^T. Mapping of the paper's symbols: r -> q, w_t = exp(g_t) (g <= 0, the per-channel
log decay; RWKV-7 parametrises g = -exp(-0.5) sigmoid(.)), the removal key a = -kappa_hat and the
replacement b = kappa_hat * a_lr (kappa_hat the l2-normalised removal key, a_lr the in-context
learning rate in [0, 1]), k the replacement key already scaled by the learning rate. With those
choices the transition is diag(w) - (kappa_hat * a_lr) kappa_hat^T; the op takes any a, b.
`scale` defaults to 1 as in RWKV (no 1/sqrt(K) on the receptance).

Chunk form. With the value the state returns to the rank-one part, u_t = a_t^T S_{t-1} [V], a
step reads S_t = diag(w_t) S_{t-1} + b_t u_t^T + k_t v_t^T. Inside a chunk entered with S_in,
with chunk-local per-channel cumulative gates G_i = sum_{s<=i} g_s (inclusive) and
E_i = sum_{s<i} g_s (exclusive), unrolling gives

    u_i   = (a_i * exp(E_i))^T S_in + sum_{j<i} [P_ab]_ij u_j + sum_{j<i} [P_ak]_ij v_j
    o_i   = (q_i * exp(G_i))^T S_in + sum_{j<=i} [A_qb]_ij u_j + [A_qk]_ij v_j
    S_out = exp(G_C) * S_in + sum_j exp(G_C - G_j) * (b_j u_j^T + k_j v_j^T)

where [A_xy]_ij = sum_c x_ic y_jc exp(sum_{j<s<=i} g_sc) (GLA's gated pair matrix) and
[P_xy]_ij = the same over the span (j, i-1]: a read before step i's decay. So (I - P_ab) u =
P_ak V + (A * exp(E)) S_in, a unit lower-triangular system solved once per chunk as for the delta
rule (a WY/UT form: u = U - W S_in with U, W from the solve), and the chunk states pass by the
shared `lax.scan` over chunks. P is formed by the same sub-chunked vector-gate routine on a_{i+1}
(the read of step i+1 sees the decays up to step i), shifted down one row; every exponent is a span
sum of gates, <= 0, so nothing overflows and strong decays keep exact gradients.

Shapes: q, k, a, b [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] with g <= 0; state S [B, H, K, V]
float32; o [B, T, H, V] in v's dtype.

impl: "recurrent" (lax.scan reference), "chunk" (above), "auto"; resolved by
`linear_jax.ops.registry`. No Pallas kernel yet.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.chunking import doc_masks, from_chunks, to_chunks
from linear_jax.ops.common.decay_chunk import SUB_CHUNK, _intra_vector, _map_chunks, scan_chunks
from linear_jax.ops.common.gates import cumsum_incl, rev_cumsum_excl
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros
from linear_jax.ops.common.triangular import unit_lower_solve

_HI = lax.Precision.HIGHEST


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=_HI, preferred_element_type=jnp.float32)


def rwkv7_recurrent(q, k, v, g, a, b, *, scale, initial_state, segment_ids):
    """The reference: one step per token. Inputs validated."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0 = state_or_zeros(initial_state, (B, H, K, V))

    def step(S, x):
        q_t, k_t, v_t, g_t, a_t, b_t = x
        sa = jnp.einsum("bhk,bhkv->bhv", a_t, S, precision="highest")   # a^T S_{t-1}
        S = (jnp.exp(g_t)[..., :, None] * S + b_t[..., :, None] * sa[..., None, :]
             + k_t[..., :, None] * v_t[..., None, :])
        return S, jnp.einsum("bhk,bhkv->bhv", q_t, S, precision="highest")

    xs = (f32(q) * scale, f32(k), f32(v), f32(g), f32(a), f32(b))
    return scan_time(step, S0, xs, segment_ids)


def _cumsum_excl(g, axis):
    """sum_{s < i} g_s along `axis` (a shift, then a cumulative sum: no subtraction)."""
    g = jnp.moveaxis(g, axis, -1)
    shifted = jnp.concatenate([jnp.zeros_like(g[..., :1]), g[..., :-1]], axis=-1)
    return jnp.moveaxis(jnp.cumsum(shifted, axis=-1), -1, axis)


def rwkv7_chunk(q, k, v, g, a, b, *, scale, initial_state, segment_ids, chunk_size):
    """Chunk-parallel RWKV-7 (module docstring). Returns o [B,T,H,V] float32, S [B,H,K,V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    f32 = lambda x: x.astype(jnp.float32)
    qc = to_chunks(f32(q) * scale, C)
    kc, vc, gc, ac, bc = (to_chunks(f32(x), C) for x in (k, v, g, a, b))
    N = qc.shape[2]
    same, in_rows, out_rows, keep = doc_masks(segment_ids, T, C, N)

    # the four gated pair matrices in one map over chunks (stacked on the batch axis); the reads
    # use a_{i+1} so that row i spans (j, i] and, shifted down one row, (j, i-1]
    a_next = jnp.concatenate([ac[..., 1:, :], jnp.zeros_like(ac[..., :1, :])], axis=3)
    causal = jnp.tril(jnp.ones((C, C), bool))[None, None, None]
    four = lambda x: jnp.concatenate([x] * 4, axis=0)
    pairs = _map_chunks(lambda *x: _intra_vector(*x, math.gcd(C, SUB_CHUNK)),
                        jnp.concatenate([qc, qc, a_next, a_next], 0),
                        jnp.concatenate([kc, bc, bc, kc], 0), four(gc), causal)
    A_qk, A_qb, P_ab, P_ak = (jnp.where(same, x, 0.0) if i < 2 else x
                              for i, x in enumerate(jnp.split(pairs, 4, axis=0)))
    lower = same & ~jnp.eye(C, dtype=bool)
    down = lambda P: jnp.where(lower, jnp.concatenate(
        [jnp.zeros_like(P[..., :1, :]), P[..., :-1, :]], axis=-2), 0.0)
    P_ab, P_ak = down(P_ab), down(P_ak)

    a_in = jnp.where(in_rows[..., None], ac * jnp.exp(_cumsum_excl(gc, 3)), 0.0)
    rhs = jnp.concatenate([_einsum("bhnij,bhnjv->bhniv", P_ak, vc), a_in], axis=-1)
    X = unit_lower_solve(-P_ab, rhs)                       # (I - P_ab)^{-1} [P_ak V | a e^E]
    U, W = X[..., :V], -X[..., V:]                         # u = U - W S_in

    e_out = jnp.exp(rev_cumsum_excl(gc, 3))
    b_out = jnp.where(out_rows[..., None], bc * e_out, 0.0)
    k_out = jnp.where(out_rows[..., None], kc * e_out, 0.0)
    dS = _einsum("bhnck,bhncv->bhnkv", k_out, vc)
    decay = jnp.where(keep[..., None, None], jnp.exp(gc.sum(3))[..., None], 0.0)
    S0 = state_or_zeros(initial_state, (B, H, K, V))
    S_final, S_in, u = scan_chunks(S0, decay, dS, W=W, U=U, k_out=b_out)

    q_in = jnp.where(in_rows[..., None], qc * jnp.exp(cumsum_incl(gc, 3)), 0.0)
    o = (_einsum("bhnij,bhnjv->bhniv", A_qb, u) + _einsum("bhnij,bhnjv->bhniv", A_qk, vc)
         + _einsum("bhnik,bhnkv->bhniv", q_in, S_in))
    return from_chunks(o, T), S_final


registry.register(registry.OpRecord(
    "rwkv7", reference=rwkv7_recurrent, chunk=rwkv7_chunk,
    seq_parallel="linear_jax.parallel.rank_one:rwkv7"))


def rwkv7(q, k, v, g, a, b, *, scale=1.0, initial_state=None, segment_ids=None, chunk_size=64,
          impl="auto", config=None):
    """RWKV-7's time mixing. Returns `(o [B,T,H,V], final_state [B,H,K,V] float32)`.

    q (RWKV's receptance r), k, a, b [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] <= 0 the log
    decay. `config` is accepted for a uniform signature (no kernel; the XLA forms ignore it).
    """
    B, T, H, K, V = _checks.check_qkv("rwkv7", q, k, v)
    if q.shape[2] != H:
        raise ValueError(f"rwkv7: q, k and v must have the same number of heads, got "
                         f"q{_checks.shape_str(q)} and v{_checks.shape_str(v)}")
    for name, x in (("g", g), ("a", a), ("b", b)):
        _checks.check_gate("rwkv7", name, x, B, T, H, K)
    _checks.check_log_decay("g", g)
    _checks.check_state("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch("rwkv7", impl, T, config, args=(q, k, v))
    o, S = run(q, k, v, g, a, b, scale=1.0 if scale is None else scale,
               initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), S
