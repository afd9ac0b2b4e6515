"""Mamba-3's MIMO recurrence: the SISO recurrence of `linear_jax.ops.mamba3` with rank-r inputs
and outputs per head (Lahoti et al. 2026, "Mamba-3", the multi-input multi-output SSM).

    S_t = exp(g_t) R(theta_t)^T (S_{t-1} + (1 - lam_t) dt_t K_{t-1}^T V_{t-1})
          + lam_t dt_t K_t^T V_t
    O_t = scale * Q_t S_t

with K_t, Q_t [r, N] (the paper's B_t, C_t, r columns each) and V_t [r, P] (its X_t): a step writes
the rank-r update K_t^T V_t = sum_i k_{t,i} v_{t,i}^T into the same [N, P] state and reads r
outputs O_t [r, P]. The state per head is SISO's; the work per step, and so the arithmetic
intensity of decoding, grows with r. r = 1 is SISO.

Chunk form: the SISO chunk form on a time axis of 3r Euler sub-steps per step (trap = 1, dt = 1,
the step's weights folded into the keys), which reproduces a step exactly:
  1. r sub-steps write (1 - lam_t) dt_t k_{t-1,i} v_{t-1,i}^T (the previous step's inputs, before
     the transition; zero at a document's first step), with no transition;
  2. r sub-steps write lam_t dt_t k_{t,i} v_{t,i}^T, the first of them taking the step's
     transition exp(g_t) R(theta_t)^T;
  3. r sub-steps read q_{t,i} (no write, no transition): their outputs are O_t.
So it costs 3r times SISO's chunk form at the same T (`chunk_size` counts sub-steps), and inherits
its exactness under strong decays.

Shapes: q, k [B, T, Hk, r, N]; v [B, T, H, r, P]; g, dt, trap [B, T, H]; theta [B, T, H, R] with
R <= N / 2; state (S [B, H, N, P], k_last [B, H, r, N], v_last [B, H, r, P]) float32;
o [B, T, H, r, P] in v's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from linear_jax.ops import _checks, registry
from linear_jax.ops.common.recurrent import scan_time
from linear_jax.ops.mamba3 import checked_run, mamba3_chunk, prev_weight, rotate, states


def mamba3_mimo_recurrent(q, k, v, g, dt, trap, theta, *, scale, initial_state, segment_ids):
    """The reference: one step per token, rank-r writes and reads. Inputs validated."""
    B, T, H, r, N = q.shape
    P = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)

    def step(state, x):
        S, k_last, v_last = state
        q_t, k_t, v_t, g_t, dt_t, lam_t, th_t = x
        prev = jnp.einsum("bhrn,bhrp->bhnp", k_last, v_last, precision="highest")
        S = S + ((1.0 - lam_t) * dt_t)[..., None, None] * prev
        S = jnp.swapaxes(rotate(jnp.swapaxes(S, -1, -2), -th_t[..., None, :]), -1, -2)
        now = jnp.einsum("bhrn,bhrp->bhnp", k_t, v_t, precision="highest")
        S = jnp.exp(g_t)[..., None, None] * S + (lam_t * dt_t)[..., None, None] * now
        o = jnp.einsum("bhrn,bhnp->bhrp", q_t, S, precision="highest")
        return (S, k_t, v_t), o

    xs = (f32(q) * scale, f32(k), f32(v), f32(g), f32(dt), f32(trap), f32(theta))
    return scan_time(step, states(initial_state, (B, H, N, P), (B, H, r, N), (B, H, r, P)), xs,
                     segment_ids)


def _substeps(*phases):
    """[B, T, H, r, ...] per phase -> [B, 3 r T, H, ...]: step t's sub-steps in phase order."""
    x = jnp.concatenate(phases, axis=3)                                  # [B, T, H, 3r, ...]
    x = jnp.moveaxis(x, 3, 2)
    return x.reshape((x.shape[0], -1) + x.shape[3:])


def substeps(q, k, v, g, dt, trap, theta, k0, v0, segment_ids):
    """SISO's arguments (q, k, v, g, dt, trap, theta) over 3r sub-steps per step (module
    docstring), and their segment ids. Inputs float32, heads expanded; k0 [B,H,r,N], v0 [B,H,r,P]
    the keys and values of the step before the first."""
    r = q.shape[3]
    w_prev = prev_weight(dt, trap, segment_ids)
    k_prev = jnp.concatenate([k0[:, None], k[:, :-1]], axis=1) * w_prev[..., None, None]
    v_prev = jnp.concatenate([v0[:, None], v[:, :-1]], axis=1)
    # the step's transition sits on the first sub-step of phase 2
    first = (jnp.arange(3 * r) == r).astype(jnp.float32)
    gs = _substeps(g[..., None] * first)
    ones = jnp.ones(gs.shape, jnp.float32)
    args = (_substeps(jnp.zeros_like(q), jnp.zeros_like(q), q),
            _substeps(k_prev, k * (trap * dt)[..., None, None], jnp.zeros_like(k)),
            _substeps(v_prev, v, jnp.zeros_like(v)), gs, ones, ones,
            _substeps(theta[..., None, :] * first[:, None]))
    return args, None if segment_ids is None else jnp.repeat(segment_ids, 3 * r, axis=1)


def step_outputs(o, r):
    """SISO's outputs over the sub-steps [B, 3rT, H, P] -> the steps' [B, T, H, r, P]."""
    B, _, H, P = o.shape
    return jnp.moveaxis(o.reshape(B, -1, 3 * r, H, P)[:, :, 2 * r:], 2, 3)


def mamba3_mimo_chunk(q, k, v, g, dt, trap, theta, *, scale, initial_state, segment_ids,
                      chunk_size):
    """The chunk form (module docstring): SISO's on 3r sub-steps per step."""
    B, T, H, r, N = q.shape
    P = v.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)
    S0, k0, v0 = states(initial_state, (B, H, N, P), (B, H, r, N), (B, H, r, P))
    args, seg = substeps(*(f32(x) for x in (q, k, v, g, dt, trap, theta)), k0, v0, segment_ids)
    o, (S, _, _) = mamba3_chunk(
        *args, scale=scale, segment_ids=seg, chunk_size=chunk_size,
        initial_state=(S0, jnp.zeros((B, H, N), jnp.float32), jnp.zeros((B, H, P), jnp.float32)))
    return step_outputs(o, r), (S, f32(k[:, -1]), f32(v[:, -1]))


registry.register(registry.OpRecord("mamba3_mimo", reference=mamba3_mimo_recurrent,
                                    chunk=mamba3_mimo_chunk,
                                    seq_parallel="linear_jax.parallel.mamba3:mamba3_mimo"))


def mamba3_mimo(q, k, v, g, dt, trap, theta, *, scale=1.0, initial_state=None, segment_ids=None,
                chunk_size=64, impl="auto", config=None):
    """Mamba-3's MIMO recurrence (module docstring). Returns `(o [B,T,H,r,P], (S [B,H,N,P],
    k_last [B,H,r,N], v_last [B,H,r,P]))`, all of the state float32.

    q = C, k = B [B, T, Hk, r, N]; v = x [B, T, H, r, P]; g, dt, trap, theta as `ops.mamba3`.
    `config` is accepted for a uniform signature (no kernel).
    """
    for name, x, layout in (("q", q, "[B, T, Hk, r, N]"), ("k", k, "[B, T, Hk, r, N]"),
                            ("v", v, "[B, T, H, r, P]")):
        _checks.check_rank(name, x, 5, layout)
    _checks.check_dims("mamba3_mimo", [("q", q, 3), ("k", k, 3), ("v", v, 3)],
                       "the rank r (axis 3)")
    dims = _checks.check_qkv("mamba3_mimo", q[:, :, :, 0], k[:, :, :, 0], v[:, :, :, 0])
    return checked_run("mamba3_mimo", dims, q, k, v, g, dt, trap, theta, r=q.shape[3],
                       scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                       chunk_size=chunk_size, impl=impl, config=config)
