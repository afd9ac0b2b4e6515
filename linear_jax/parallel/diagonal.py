"""Sequence-parallel diagonal recurrences: `diagonal_scan` (the RG-LRU's) and `hgrn`.

    h_t = a_t * h_{t-1} + x_t        element-wise over D; hgrn: a_t = exp(g_t)

Run from an entering state h_in, a shard's outputs are h_loc_t + A_t * h_in and its leaving state
N + A_last * h_in, with A_t the product of the shard's a up to t (zero from its first document
reset on). That is the decay family's diagonal ("vector") map with one head, K = D and V = 1, so
`linear_jax.parallel.affine` does the exchange: one all-gather of (N, A_last, the boundary
segment ids) forward, one of dL/dh_in backward.

The local pass is ONE run of the single-device op (any impl) on doubled channels, inputs [x | 0]
from the state [0 | 1]: the second half comes out as A_t, reset by the op itself where a document
starts, so packed documents need nothing here. It runs in float32 (the inputs x are cast; the op
returns its output in x's dtype) so A is not rounded to bf16 before the correction.

Complex a (the LRU, S5, S4D): the exchange packs float32, so a complex state travels as its real
and imaginary parts and A_last acts on them as a 2x2 rotation-scaling (`_codec`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax import _compat, ops
from linear_jax.parallel.affine import affine_shard
from linear_jax.parallel.decay import DEFAULT_MODE
from linear_jax.parallel.mesh import run_on_mesh


def _is_complex(*xs):
    return any(x is not None and jnp.issubdtype(x.dtype, jnp.complexfloating) for x in xs)


def _codec(B, D, complex_):
    """(kind, state shape, h [B,D] -> the exchanged real state, its inverse, A_last -> M).
    Real: the "vector" map with one head. Complex: the exchange is float32, so h travels as
    (Re, Im), a head per channel, and multiplying by A_last is the 2x2 rotation-scaling
    [[Re, -Im], [Im, Re]] ("matrix")."""
    if not complex_:
        return ("vector", (B, 1, D, 1), lambda h: h.reshape(B, 1, D, 1),
                lambda S: S.reshape(B, D), lambda m: m[:, None])
    pair = lambda h: jnp.stack([h.real, h.imag], -1)[..., None]
    rot = lambda m: jnp.stack([jnp.stack([m.real, -m.imag], -1),
                               jnp.stack([m.imag, m.real], -1)], -2)
    return "matrix", (B, D, 2, 1), pair, lambda S: lax.complex(S[..., 0, 0], S[..., 1, 0]), rot


def diagonal_local(op, gate, x, *, axis_name="seq", initial_state=None, segment_ids=None,
                   chunk_size=64, impl="auto", config=None, mode=DEFAULT_MODE):
    """`op` ("diagonal_scan": gate = a; "hgrn": gate = g = log a) on the local shard of a
    sequence split along `axis_name`; call inside `shard_map`. gate, x [B,T_loc,D]. Returns
    (h [B,T_loc,D], the global final state [B,D]) with the single-device op's dtypes."""
    B, _, D = x.shape
    kw = dict(chunk_size=chunk_size, impl=impl, config=config)
    run = (lambda a, x, **k: ops.diagonal_scan(a, x, **k)) if op == "diagonal_scan" else (
        lambda g, x, **k: ops.hgrn(x, g, **k))
    complex_ = _is_complex(gate, x, initial_state)
    dtype = jnp.complex64 if complex_ else jnp.float32
    kind, shape, to_state, from_state, map_of = _codec(B, D, complex_)

    def pre(xs, seg):
        gate, x = xs
        h0 = _compat.zeros_varying((B, 2 * D), gate, x).astype(dtype) + jnp.concatenate(
            [jnp.zeros((D,), dtype), jnp.ones((D,), dtype)])
        x2 = jnp.concatenate([x.astype(dtype), jnp.zeros(x.shape, dtype)], -1)
        h, hT = run(jnp.concatenate([gate, gate], -1), x2, initial_state=h0, segment_ids=seg,
                    **kw)
        return (h[..., :D], h[..., D:]), to_state(hT[:, :D]), map_of(hT[:, D:])

    def post(xs, seg, parts, S_in):
        h_loc, a_cum = parts
        return (h_loc + a_cum * from_state(S_in)[:, None]).astype(
            dtype if complex_ else xs[1].dtype)

    def rerun(xs, seg, S_in):
        h, hT = run(*xs, initial_state=from_state(S_in), segment_ids=seg, **kw)
        return h, to_state(hT)

    h, hT = affine_shard(pre, post, kind, (gate, x), shape,
                         None if initial_state is None else to_state(initial_state), segment_ids,
                         axis_name=axis_name, mode=mode, rerun=rerun)
    return h, from_state(hT)


def _public(op, gate, x, *, mesh, axis_name, batch_axes, head_axes, initial_state, segment_ids,
            **kw):
    if mesh is None:
        return diagonal_local(op, gate, x, axis_name=axis_name, initial_state=initial_state,
                              segment_ids=segment_ids, **kw)
    # the channels are independent: a head axis may split them like heads
    local = lambda gate, x, **a: diagonal_local(op, gate, x, **a, **kw)
    return run_on_mesh(local, mesh, (gate, x), initial_state=initial_state,
                       segment_ids=segment_ids, seq_axis=axis_name, batch_axes=batch_axes,
                       head_axes=head_axes, kernel_op=(op, kw["impl"], kw["config"]))


def diagonal_scan(a, x, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
                  initial_state=None, segment_ids=None, chunk_size=64, impl="auto", config=None,
                  mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.diagonal_scan`, real or complex a, x [B,T,D] (mesh
    arguments as `linear_jax.parallel.simple_gla`). Returns `(h [B,T,D], final_state [B,D])`:
    real, h in x's dtype and the state float32; complex, both complex64."""
    return _public("diagonal_scan", a, x, mesh=mesh, axis_name=axis_name, batch_axes=batch_axes,
                   head_axes=head_axes, initial_state=initial_state, segment_ids=segment_ids,
                   chunk_size=chunk_size, impl=impl, config=config, mode=mode)


def hgrn(x, g, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
         initial_state=None, segment_ids=None, chunk_size=64, impl="auto", config=None,
         mode=DEFAULT_MODE):
    """Sequence-parallel `linear_jax.ops.hgrn` (mesh arguments as
    `linear_jax.parallel.simple_gla`). Returns `(h [B,T,D], final_state [B,D] float32)`."""
    return _public("hgrn", g, x, mesh=mesh, axis_name=axis_name, batch_axes=batch_axes,
                   head_axes=head_axes, initial_state=initial_state, segment_ids=segment_ids,
                   chunk_size=chunk_size, impl=impl, config=config, mode=mode)
