"""The selective scan's work around its scan, in XLA, shared by the op's XLA forms and its kernels.

`unfused(core)`: the step size softplus(delta + bias) before the scan, the D skip and the z gate
after it (`linear_jax.ops.selective_scan` states the math), turning a scan over (dt, dt * u, A, B,
C) into an impl that takes the op's own arguments.

`pad_inputs` and `scan_vjp`: the entry of both selective-scan kernels (`kernels/gpu/selective.py`,
`kernels/tpu/selective.py`): zero padding of T, of each group's channels and of N, the initial
state and the resets, and the `custom_vjp` that joins a forward kernel (which stores one state per
chunk) to its backward kernel and sums the backward's per-block partial dA, dB, dC. What stays in
each kernel module is its layout: the Triton kernel reads [B, T, G, N] B / C, [D, N] A and
[B, D, N] states and pads N to a power of two (a `tl.dot` and block shapes must be); the TPU kernel
takes [B, G, T, N] B / C, A^T and [B, N, D] states (channels on lanes, N on sublanes, N padded to
a multiple of 8) and its resets as a [T / C, C] table per sequence; each picks its own channel
block and chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from linear_jax.ops.common.chunking import pad_groups, pad_to, resets, unpad_groups
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


def pad_inputs(dt, x, A, Bm, Cm, initial_state, segment_ids, *, Tp: int, Dgp: int, Np: int):
    """A selective-scan kernel's inputs zero-padded: T to Tp, each of the G groups' channels to
    Dgp, N to Np (dtypes kept). Zeros leave every real state untouched: a padded step has dt = x =
    0 (a = 1, no input), a padded channel or state entry starts at 0 with A = 0 and B = C = 0.

    dt, x [B, T, D]; A [D, N]; Bm, Cm [B, T, G, N]; initial_state [B, D, N] or None. Returns
    ((dt, x [B, Tp, G Dgp], A [G Dgp, Np], Bm, Cm [B, Tp, G, Np], h0 [B, G Dgp, Np] float32,
    resets bool [B, Tp] or None), unpad), where unpad(y [B, Tp, G Dgp], hT [B, G Dgp, Np]) gives
    (y [B, T, D], hT [B, D, N])."""
    Bsz, T, D = x.shape
    G, N = Bm.shape[2:]
    Dg = D // G
    chan = lambda v, axis: pad_groups(v, axis, G, Dgp)
    seq = lambda v: pad_to(chan(v, 2), 1, Tp)
    grouped = lambda M: pad_to(pad_to(M, 1, Tp), 3, Np)
    h0 = (jnp.zeros((Bsz, D, N), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    r = None if segment_ids is None else pad_to(resets(segment_ids), 1, Tp)

    def unpad(y, hT):
        return unpad_groups(y[:, :T], 2, G, Dg), unpad_groups(hT[..., :N], 1, G, Dg)

    padded = (seq(dt), seq(x), pad_to(chan(A, 0), 1, Np), grouped(Bm), grouped(Cm),
              pad_to(chan(h0, 1), 2, Np), r)
    return padded, unpad


def scan_vjp(forward, backward, group_axis: int):
    """The `custom_vjp` of a selective-scan kernel pair over padded inputs (dt, x, A, Bm, Cm, h0,
    r) -> (y, hT), in the kernel's own layout, with the groups of Bm and Cm on `group_axis`.

    forward(dt, x, A, Bm, Cm, h0, r, save) -> (y, hT), and with `save` also the state entering
    every chunk. backward(dt, x, A, Bm, Cm, states, dy, dhT, r) -> (d dt, d x, dA per sequence,
    dB and dC per channel block, d h0), the blocks on `group_axis` (a group's blocks consecutive):
    summed here per group, and dA over the sequences."""

    def per_group(d, G):
        s = d.shape
        return d.reshape(s[:group_axis] + (G, -1) + s[group_axis + 1:]).sum(group_axis + 1)

    def fwd(dt, x, A, Bm, Cm, h0, r):
        y, hT, states = forward(dt, x, A, Bm, Cm, h0, r, save=True)
        return (y, hT), (dt, x, A, Bm, Cm, states, r)

    def bwd(res, cts):
        dt, x, A, Bm, Cm, states, r = res
        ddt, dx, dA, dB, dC, dh0 = backward(*res[:6], *cts, r)
        G = Bm.shape[group_axis]
        return (ddt, dx, dA.sum(0).astype(A.dtype), per_group(dB, G).astype(Bm.dtype),
                per_group(dC, G).astype(Cm.dtype), dh0, None)

    f = jax.custom_vjp(lambda *args: tuple(forward(*args, save=False)))
    f.defvjp(fwd, bwd)
    return f
