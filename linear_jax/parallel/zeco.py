"""ZeCO ordering of the decay-family chunk form (Chou et al. 2025, "ZeCO: Zero Communication
Overhead Sequence Parallelism for Linear Attention"), as the `pre`/`post` pair of
`linear_jax.parallel.affine`.

The chunk form of `linear_jax.ops.common.decay_chunk` (read its docstring for the math) is cut
between its two stages:

  pre   intra-chunk matrices A, the chunk states h_c from a zero state (one `lax.scan`), and the
        cumulative decay from the shard start to each chunk start, gh_c = exp(sum of the gates of
        chunks < c) (0 once a chunk held a reset); N = the leaving state, M = gh_{N_chunks};
  post  h_c += gh_c * S_in (elementwise, O(N K V)), then o = A v + q_in h, the outputs the chunk
        form computes anyway: the correction GEMM Q~ S_in [T K V] of the "gemm" staging is gone.

Backward (through `affine`'s custom VJP) mirrors it: the transpose of `post` yields D = dL/dS_in as
sum_c gh_c * dh_c, and the transpose of `pre`'s state scan carries the leaving-state cotangent.
Both stages reuse the chunk form's own pieces (`decay_chunk.chunk_pieces`, `pass_states`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax import _compat
from linear_jax.ops.common.chunking import from_chunks, to_chunks
from linear_jax.ops.common.decay_chunk import chunk_pieces, pass_states
from linear_jax.ops.common.heads import repeat_heads


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def stages(kind, *, scale, chunk_size):
    """(pre, post) for x = (q, k, v, g); `kind` is affine's map kind for this gate."""
    C = int(chunk_size)
    f32 = lambda a: a.astype(jnp.float32)

    def pre(x, segment_ids):
        q, k, v, g = x
        B, T, H, V = v.shape
        q, k = repeat_heads(q, H), repeat_heads(k, H)
        K = q.shape[-1]
        p = chunk_pieces(q, k, v, g, scale=scale, segment_ids=segment_ids, chunk_size=C)
        N = p.dS.shape[2]
        keep, tot = p.keep, p.log_decay
        S0 = _compat.zeros_varying((B, H, K, V), q, k, v, g)
        S_last, h = pass_states(p, S0)                           # h [B,H,N,K,V] from zero
        decay = jnp.broadcast_to(tot, (B, H, N) + tot.shape[3:])
        # decay from the shard start to each chunk start: span sums of whole chunks, and 0 once
        # an earlier chunk held a reset
        start = jnp.concatenate([jnp.zeros_like(tot[:, :, :1]), jnp.cumsum(tot, 2)[:, :, :-1]], 2)
        start = jnp.broadcast_to(jnp.exp(start), decay.shape)
        clean = jnp.cumsum(jnp.broadcast_to(~keep, (B, 1, N, 1, 1)).astype(jnp.int32), 2)
        gh = jnp.where(clean - (~keep).astype(jnp.int32) == 0, start, 0.0)
        M = None
        if kind != "identity":
            M = jnp.where(clean[:, :, -1] == 0, jnp.exp(tot.sum(2)), 0.0)  # [B|1,H|1,K|1,1]
            M = jnp.broadcast_to(M[..., 0], (B, H, K))
            M = M if kind == "vector" else M[..., 0]
        return (p.A, p.q_in, h, gh), S_last, M

    def post(x, segment_ids, parts, S_in):
        A, q_in, h, gh = parts
        v = x[2]
        h = h + gh * S_in[:, :, None]
        o = _einsum("bhnij,bhnjv->bhniv", A, to_chunks(f32(v), C))
        o = o + _einsum("bhnik,bhnkv->bhniv", q_in, h)
        return from_chunks(o, v.shape[1]).astype(v.dtype)

    return pre, post
