"""The selective scan's element-wise work around its scan, in XLA: the step size softplus(delta +
bias) before it, the D skip and the z gate after it (`linear_jax.ops.selective_scan` states the
math). The op's XLA forms and the kernels that do not fuse these steps share it: `unfused(core)`
turns a scan over (dt, dt * u, A, B, C) into an impl that takes the op's own arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linear_jax.ops.common.gates import step_size


def prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """The op's arguments as the unfused impls take them, float32: (dt, dt * u, A, B, C) with
    B, C grouped [B, T, G, N]."""
    f32 = lambda x: x.astype(jnp.float32)
    dt = step_size(delta, delta_bias, delta_softplus)
    group = lambda M: f32(M)[:, :, None] if M.ndim == 3 else f32(M)
    return dt, dt * f32(u), f32(A), group(B), group(C)


def finish(y, u, D, z):
    """y + D u, then times silu(z) (float32)."""
    y = y.astype(jnp.float32)
    if D is not None:
        y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def unfused(core):
    """An impl with the op's arguments from `core(dt, dt * u, A, B, C, **kw)`: the step size, the
    D skip and the z gate in XLA around it. Every impl takes (u, delta, A, B, C, D, z, delta_bias,
    delta_softplus, *, initial_state, segment_ids[, chunk_size]) and returns (y, final state); a
    kernel may fuse what this does in XLA."""
    def impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kw):
        y, hT = core(*prepare(u, delta, A, B, C, delta_bias, delta_softplus), **kw)
        return finish(y, u, D, z), hT

    return impl
