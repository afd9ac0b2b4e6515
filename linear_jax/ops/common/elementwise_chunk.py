"""Chunked scans of element-wise linear recurrences, written once for HGRN, diagonal scans (real or
complex: LRU, S5, GateLoop) and Mamba's selective scan.

    h_t = a_t * h_{t-1} + b_t          (element-wise; a, b, h real or complex)

Time is cut into chunks of C steps. Inside a chunk, `lax.associative_scan` over the pairs (a, b),
composed as (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2), gives every step's transition from the
state entering the chunk:

    h_i = P_i * h_in + H_i,      P_i = prod_{s <= i} a_s,      H_i = h_i computed from h_in = 0

and one `lax.scan` over the chunks carries h_in -> h_out = P_last h_in + H_last. JAX's associative
scan is work-efficient (a few combines per step), the sequential depth is T / C + 2 log2 C, and the
scan tree never spans more than one chunk: its program has log2 C levels whatever T is, and its
strided accesses stay inside a chunk.

Stability: only products of a's and a-weighted sums of b's are formed, never ratios such as
H_i / P_i or exp(-G): with |a| <= 1 every partial product has modulus <= 1 and can only underflow to
an exact 0, so finite inputs give finite outputs and gradients. A log-decay gate g <= 0 enters as
a = exp(g).

Packed documents: a reset before step t (`chunking.resets`) is the mask a_t -> 0, which is exactly
"the state is zeroed before t" (P and h_out then drop h_in past the reset), never a -inf log gate;
autodiff of the mask gives a_t no gradient there, as the recurrence does. Padding past T is a = 1,
b = 0, which leaves the state unchanged, so the last carry is the final state.

Two drivers share this:

* `chunk_scan(a, b)` for recurrences whose a and b are as large as the inputs (HGRN, diagonal
  scans, [B, T, D]): the in-chunk scans of all chunks run at once, then the light carry scan.
  Autodiff keeps O(T D) without recomputation: the levels of a scan tree halve in size, so together
  they hold about as much as one input (rebuilding them in the backward pass measured ~10% less
  memory for ~1.5-2x the time on CPU, not worth it).
* `chunk_scan_fused(make, read, xs)` for recurrences whose per-step a and b are larger than their
  inputs (the selective scan: [D, N] per step from [D] and [N] inputs): a `lax.scan` over chunks
  builds one chunk's a and b inside its body, scans, reads the output out and drops them. The body
  is rebuilt in the backward pass (`jax.checkpoint`), so autodiff keeps one entering state per
  chunk and never [T, D, N].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linear_jax.ops.common.chunking import num_chunks, resets


def _compose(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


def local_scan(a, b, axis: int):
    """Inclusive scan of (a, b) along `axis`: returns (P, H) of the module docstring."""
    return lax.associative_scan(_compose, (a, b), axis=axis)


def _expand(mask, ndim: int):
    """[B, T] -> [B, T, 1, ...] with `ndim` axes in all."""
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _time_chunks(x, C: int, fill):
    """[B, T, ...] -> [B, N, C, ...], padded in T with `fill`."""
    B, T = x.shape[:2]
    N = num_chunks(T, C)
    if N * C != T:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, N * C - T)
        x = jnp.pad(x, widths, constant_values=fill)
    return x.reshape(B, N, C, *x.shape[2:])


def _reset_mask(segment_ids, B: int, T: int):
    return jnp.zeros((B, T), bool) if segment_ids is None else resets(segment_ids)


def chunk_scan(a, b, *, initial_state, segment_ids, chunk_size):
    """h_t = a_t * h_{t-1} + b_t along axis 1, by chunks.

    a, b [B, T, ...] of one shape and one (float32 or complex64) dtype; initial_state [B, ...] or
    None (zeros). Returns h [B, T, ...] and the final state [B, ...].
    """
    B, T = b.shape[:2]
    C = min(int(chunk_size), T)
    if segment_ids is not None:
        a = jnp.where(_expand(resets(segment_ids), a.ndim), jnp.zeros_like(a), a)
    ac, bc = _time_chunks(a, C, 1), _time_chunks(b, C, 0)             # [B, N, C, ...]
    P, H = local_scan(ac, bc, axis=2)

    def carry(h, x):
        p_last, h_last = x
        return p_last * h + h_last, h

    h0 = jnp.zeros(b.shape[:1] + b.shape[2:], b.dtype) if initial_state is None else initial_state
    hT, h_in = lax.scan(carry, h0.astype(b.dtype),
                        (jnp.moveaxis(P[:, :, -1], 1, 0), jnp.moveaxis(H[:, :, -1], 1, 0)))
    h = P * jnp.moveaxis(h_in, 0, 1)[:, :, None] + H
    return h.reshape(B, -1, *h.shape[3:])[:, :T], hT


def chunk_scan_fused(make, read, xs, h0, *, segment_ids, chunk_size):
    """h_t = a_t * h_{t-1} + b_t with a, b built and read out chunk by chunk.

    xs: a pytree of per-step inputs [B, T, ...]; `make(xs_chunk) -> (a, b)` of shape [B, C, *S];
    `read(h [B, C, *S], xs_chunk) -> y [B, C, ...]`; h0 [B, *S]. Both functions see zero-padded
    steps past T (their a, b there are replaced by 1, 0). Returns y [B, T, ...] and h_T [B, *S].
    """
    leaves = jax.tree.leaves(xs)
    B, T = leaves[0].shape[:2]
    C = min(int(chunk_size), T)
    N = num_chunks(T, C)
    step_of = lambda x, fill=0: jnp.moveaxis(_time_chunks(x, C, fill), 1, 0)   # [N, B, C, ...]
    reset_c = step_of(_reset_mask(segment_ids, B, T), False)
    pad_c = step_of(jnp.zeros((B, T), bool), True)

    def body(h_in, x):
        xs_c, r, pad = x
        a, b = make(xs_c)
        r, pad = _expand(r, a.ndim), _expand(pad, a.ndim)
        a = jnp.where(r, 0.0, jnp.where(pad, 1.0, a))
        b = jnp.where(pad, 0.0, b)
        P, H = local_scan(a, b, axis=1)
        h = P * h_in[:, None] + H
        return h[:, -1], read(h, xs_c)

    hT, ys = lax.scan(jax.checkpoint(body), h0, (jax.tree.map(step_of, xs), reset_c, pad_c))
    ys = jnp.moveaxis(ys, 0, 1)                                         # [B, N, C, ...]
    return ys.reshape(B, N * C, *ys.shape[3:])[:, :T], hT
