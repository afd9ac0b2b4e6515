"""Mamba-3's SISO recurrence: exponential-trapezoidal discretisation with a rotary (complex) state.

    S_t = exp(g_t) R(theta_t)^T (S_{t-1} + (1 - lam_t) dt_t k_{t-1} v_{t-1}^T)
          + lam_t dt_t k_t v_t^T
    o_t = scale * S_t^T q_t

Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State Space Principles", in the
linear-attention naming: q = C, k = B, v = x, state S [N, P] (the reference's h transposed),
g = A dt <= 0. Of the paper this covers
  - the exponential-trapezoidal rule: the input integral over (t-1, t] is the trapezoid of its two
    ends, lam_t (in [0, 1], `trap`) on the current input and 1 - lam_t on the previous one, which
    is carried across the step's transition (lam = 1 is Mamba-2's Euler rule);
  - the complex state as a data-dependent rotation: each pair of state rows (2i, 2i+1), i < R, is
    rotated by the step's angle theta_t[i] (R(theta) rotates a pair by +theta; the other rows are
    real). Equivalently queries and keys are rotated by the cumulative angle (the paper's
    "RoPE trick"); the state returned is the unrotated one, so a sequence split in two calls
    needs no angle carried between them.
Not covered: MIMO (rank-r inputs and outputs per head: `linear_jax.ops.mamba3_mimo`, on this
chunk form), and everything of the block (projections, B/C norms and biases, D, gating), which is
`linear_jax.layers.mamba3`.

State: a tuple (S [B, H, N, P] float32, k_last [B, H, N], v_last [B, H, P]), the last key and value
the next step's trapezoid needs (zeroed, like S, where a packed document starts: its first step has
no previous input, as in the reference recurrence).

Chunk form: a pair of state rows is one complex row z = S[2i] + i S[2i+1], on which the step acts
as the complex diagonal decay exp(g_t - i theta_t); the real rows decay by exp(g_t). So the
recurrence is GLA's with a complex per-channel log gate and two writes per step, the previous
input's written before the step's transition (its key multiplied by exp(g_t - i theta_t)):

    z_t = exp(g_t - i theta_t) (z_{t-1} + (1 - lam_t) dt_t k_{t-1} v_{t-1}^T) + lam_t dt_t k_t v_t^T

with keys as complex rows too and o_t = Re(conj(q_t)^T z_t). It runs on the decay family's
sub-chunked vector-gate intra-chunk matrices and chunk state scan
(`linear_jax.ops.common.decay_chunk`), in complex64. Every rotation is then a span sum of angles
between a key and a query, as every decay is a span sum of gates, so no angle cancels against
itself: the gradient of theta stays exact when the decay is strong (rotating q and k by the
cumulative angle instead, the paper's "RoPE trick", leaves rounding of O(1) where the true
gradient is exp(-20)).

Shapes: q, k [B, T, Hk, N] (H a multiple of Hk); v [B, T, H, P]; g, dt, trap [B, T, H];
theta [B, T, H, R] with R <= N / 2; o [B, T, H, P] in v's dtype.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.chunking import doc_masks, from_chunks, resets, to_chunks
from linear_jax.ops.common.decay_chunk import SUB_CHUNK, _intra_vector, _map_chunks, scan_chunks
from linear_jax.ops.common.gates import cumsum_incl, rev_cumsum_excl
from linear_jax.ops.common.heads import repeat_heads
from linear_jax.ops.common.recurrent import scan_time, state_or_zeros


def rotate(x, angle):
    """Rotates the pairs (x[2i], x[2i+1]), i < R, of the last axis of x by +angle[..., i]; the
    rest of x unchanged. x [..., N], angle [..., R] (leading axes broadcast)."""
    R = angle.shape[-1]
    pairs = x[..., : 2 * R].reshape(x.shape[:-1] + (R, 2))
    c, s = jnp.cos(angle), jnp.sin(angle)
    a, b = pairs[..., 0], pairs[..., 1]
    rot = jnp.stack([c * a - s * b, s * a + c * b], axis=-1).reshape(x.shape[:-1] + (2 * R,))
    return jnp.concatenate([rot, x[..., 2 * R:]], axis=-1)


def states(initial_state, *shapes):
    """The state tuple (S, k_last, v_last) in float32, zeros of `shapes` where none is given."""
    parts = (None,) * len(shapes) if initial_state is None else initial_state
    return tuple(state_or_zeros(s, shape) for s, shape in zip(parts, shapes, strict=True))


def mamba3_recurrent(q, k, v, g, dt, trap, theta, *, scale, initial_state, segment_ids):
    """The reference: one step per token, the state rows rotated explicitly. Inputs validated."""
    B, T, H, N = q.shape
    P = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)

    def step(state, x):
        S, k_last, v_last = state
        q_t, k_t, v_t, g_t, dt_t, lam_t, th_t = x
        prev = k_last[..., :, None] * v_last[..., None, :]
        S = S + ((1.0 - lam_t) * dt_t)[..., None, None] * prev
        # R(theta)^T on the rows: rotate each column by -theta
        S = jnp.swapaxes(rotate(jnp.swapaxes(S, -1, -2), -th_t[..., None, :]), -1, -2)
        S = jnp.exp(g_t)[..., None, None] * S + (lam_t * dt_t)[..., None, None] * (
            k_t[..., :, None] * v_t[..., None, :])
        o = jnp.einsum("bhn,bhnp->bhp", q_t, S, precision="highest")
        return (S, k_t, v_t), o

    xs = (f32(q) * scale, f32(k), f32(v), f32(g), f32(dt), f32(trap), f32(theta))
    return scan_time(step, states(initial_state, (B, H, N, P), (B, H, N), (B, H, P)), xs,
                     segment_ids)


def _to_complex(x, R):
    """Real [..., N] -> complex [..., N - R]: the R rotated pairs as x[2i] + i x[2i+1], then the
    real channels (imaginary part 0)."""
    pairs = x[..., : 2 * R].reshape(x.shape[:-1] + (R, 2))
    return jnp.concatenate([lax.complex(pairs[..., 0], pairs[..., 1]),
                            x[..., 2 * R:].astype(jnp.complex64)], axis=-1)


def _from_complex(z, R):
    """The inverse of `_to_complex` on axis -2 of a state [..., N - R, P]."""
    pairs = jnp.stack([z[..., :R, :].real, z[..., :R, :].imag], axis=-2)
    pairs = pairs.reshape(pairs.shape[:-3] + (2 * R, pairs.shape[-1]))
    return jnp.concatenate([pairs, z[..., R:, :].real], axis=-2)


def prev_weight(dt, trap, segment_ids):
    """(1 - lam_t) dt_t [B, T, H], the weight of the previous step's input; 0 where a packed
    document starts (its first step has no previous input)."""
    w = (1.0 - trap) * dt
    return w if segment_ids is None else jnp.where(resets(segment_ids)[..., None], 0.0, w)


def _cx_einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=lax.Precision.HIGHEST)


def mamba3_chunk(q, k, v, g, dt, trap, theta, *, scale, initial_state, segment_ids, chunk_size):
    """The chunk form (module docstring). Returns o [B,T,H,P] float32 and the state tuple."""
    B, T, H, N = q.shape
    P, R = v.shape[-1], theta.shape[-1]
    C = int(chunk_size)
    f32 = lambda x: x.astype(jnp.float32)
    S0, k0, v0 = states(initial_state, (B, H, N, P), (B, H, N), (B, H, P))
    q, k, v, g, dt, trap = (f32(x) for x in (q, k, v, g, dt, trap))
    # per complex channel log gate g - i theta (the real channels: g alone)
    theta = jnp.concatenate([f32(theta), jnp.zeros(theta.shape[:-1] + (N - 2 * R,))], axis=-1)
    gate = lax.complex(jnp.broadcast_to(g[..., None], theta.shape), -theta)
    zq, zk = jnp.conj(_to_complex(q * scale, R)), _to_complex(k, R)
    # the previous step's key and value (from the state at t = 0), none at a document's start;
    # written before this step's transition, exp(gate_t), which is folded into the key
    zk_prev = jnp.concatenate([_to_complex(k0, R)[:, None], zk[:, :-1]], axis=1)
    v_prev = jnp.concatenate([v0[:, None], v[:, :-1]], axis=1)
    k_old = zk_prev * jnp.exp(gate) * prev_weight(dt, trap, segment_ids)[..., None]
    k_now = zk * (trap * dt)[..., None]

    qc, gc = to_chunks(zq, C), to_chunks(gate, C)
    kc = jnp.concatenate([to_chunks(k_now, C), to_chunks(k_old, C)], axis=-1)
    vc = jnp.concatenate([to_chunks(v, C), to_chunks(v_prev, C)], axis=-1)
    Nc = qc.shape[2]
    same, in_rows, out_rows, keep = doc_masks(segment_ids, T, C, Nc)
    M = N - R
    # the two write streams share the gate: the intra matrices of both come from one map
    pairs = _map_chunks(lambda *x: _intra_vector(*x, math.gcd(C, SUB_CHUNK)),
                        jnp.concatenate([qc, qc], 0),
                        jnp.concatenate([kc[..., :M], kc[..., M:]], 0),
                        jnp.concatenate([gc, gc], 0), jnp.concatenate([same, same], 0)
                        if same.shape[0] > 1 else same)
    A_now, A_old = jnp.split(pairs, 2, axis=0)
    q_in = jnp.where(in_rows[..., None], qc * jnp.exp(cumsum_incl(gc, 3)), 0.0)
    e_out = jnp.where(out_rows[..., None], jnp.exp(rev_cumsum_excl(gc, 3)), 0.0)
    dS = (_cx_einsum("bhnck,bhncv->bhnkv", kc[..., :M] * e_out, vc[..., :P])
          + _cx_einsum("bhnck,bhncv->bhnkv", kc[..., M:] * e_out, vc[..., P:]))
    decay = jnp.where(keep[..., None, None], jnp.exp(gc.sum(3))[..., None], 0.0)
    S_final, S_in, _ = scan_chunks(_state_to_complex(S0, R), decay, dS)
    o = (_cx_einsum("bhnij,bhnjv->bhniv", A_now, vc[..., :P])
         + _cx_einsum("bhnij,bhnjv->bhniv", A_old, vc[..., P:])
         + _cx_einsum("bhnik,bhnkv->bhniv", q_in, S_in))
    return from_chunks(o.real, T), (_from_complex(S_final, R), k[:, -1], v[:, -1])


def _state_to_complex(S, R):
    """State [..., N, P] -> complex [..., N - R, P] (rows as `_to_complex`)."""
    return jnp.swapaxes(_to_complex(jnp.swapaxes(S, -1, -2), R), -1, -2)


registry.register(registry.OpRecord("mamba3", reference=mamba3_recurrent, chunk=mamba3_chunk,
                                    seq_parallel="linear_jax.parallel.mamba3:mamba3"))


def checked_run(op, dims, q, k, v, g, dt, trap, theta, *, r=None, scale, initial_state,
                segment_ids, chunk_size, impl, config):
    """The entry of `mamba3` and (with r, the rank of its k_last and v_last) of
    `linear_jax.ops.mamba3_mimo` once q, k and v are checked, dims = (B, T, H, N, P): checks the
    other arguments, dispatches, runs with the heads of q and k expanded, casts."""
    B, T, H, N, P = dims
    for name, x in (("g", g), ("dt", dt), ("trap", trap)):
        _checks.check_gate(op, name, x, B, T, H)
    _checks.check_log_decay("g", g)
    _checks.check_rank("theta", theta, 4, "[B, T, H, R]")
    _checks.check_float("theta", theta)
    R = theta.shape[-1]
    if theta.shape[:3] != (B, T, H) or 2 * R > N:
        raise ValueError(f"{op}: theta must have shape [B, T, H, R] = ({B}, {T}, {H}, R) with "
                         f"R <= N / 2 = {N // 2}, got theta{_checks.shape_str(theta)}")
    if initial_state is not None:
        rank, rank_axis = ((), "") if r is None else ((r,), "r, ")
        layouts = ("[B, H, N, P]", f"[B, H, {rank_axis}N]", f"[B, H, {rank_axis}P]")
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
            raise ValueError(f"{op}: initial_state must be a tuple (S {layouts[0]}, k_last "
                             f"{layouts[1]}, v_last {layouts[2]})")
        for i, s, shape, layout in zip(
                range(3), initial_state, ((B, H, N, P), (B, H, *rank, N), (B, H, *rank, P)),
                layouts, strict=True):
            _checks.check_state(f"initial_state[{i}]", s, shape, layout)
    _checks.check_segment_ids(segment_ids, B, T)
    _checks.check_chunk_size(chunk_size)
    run = registry.dispatch(op, impl, T, config, args=(q, k, v))
    q, k = repeat_heads(q, H), repeat_heads(k, H)
    o, S = run(q, k, v, g, dt, trap, theta, scale=scale, initial_state=initial_state,
               segment_ids=segment_ids, chunk_size=chunk_size)
    return o.astype(v.dtype), S


def mamba3(q, k, v, g, dt, trap, theta, *, scale=1.0, initial_state=None, segment_ids=None,
           chunk_size=64, impl="auto", config=None):
    """Mamba-3's SISO recurrence (module docstring). Returns `(o [B,T,H,P], (S [B,H,N,P],
    k_last [B,H,N], v_last [B,H,P]))`, all of the state float32.

    q = C, k = B [B, T, Hk, N]; v = x [B, T, H, P]; g = A dt <= 0, dt > 0 (the step), trap in
    [0, 1] (lam) [B, T, H]; theta [B, T, H, R] the step's rotation angles (R <= N / 2). `scale`
    defaults to 1 (SSMs do not scale C). `config` is accepted for a uniform signature (no kernel).
    """
    dims = _checks.check_qkv("mamba3", q, k, v)
    return checked_run("mamba3", dims, q, k, v, g, dt, trap, theta, scale=scale,
                       initial_state=initial_state, segment_ids=segment_ids,
                       chunk_size=chunk_size, impl=impl, config=config)
