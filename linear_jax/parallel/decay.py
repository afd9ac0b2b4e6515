"""Sequence-parallel decay family: `linear_attention`, `simple_gla` (also RetNet, Mamba-2's SSD
with g = dt * A) and `gla`.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

Run from an entering state S_in, a shard's output is O_loc + Q~ S_in with
Q~_t = scale * q_t * exp(G_t), G_t the shard-local inclusive cumulative gate (<= 0, so exp(G) only
underflows), and its leaving state is N + exp(G_last) S_in (`linear_jax.parallel.affine`).

Two stagings of the local pass (`staging=`):
  "gemm"  the single-device op (any `impl`: chunk XLA, Pallas) from zero, then the correction
          GEMM Q~ S_in [T_loc K V];
  "zeco"  (ZeCO, Chou et al. 2025) the chunk form cut between its chunk-state pass and its
          outputs: chunk states from zero, exchange, fix them elementwise
          h_c += exp(G_start(c)) S_in, then the outputs read the fixed states; no extra GEMM
          (`linear_jax.parallel.zeco`; the XLA chunk form only).
"auto" picks "zeco" for the chunk form and "gemm" otherwise (CPU measurement in
docs/sequence_parallel.md).

Packed documents: rows after the shard's first reset do not read S_in (Q~ = 0 there) and a shard
holding a reset drops S_in from its leaving state (M = 0).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linear_jax import _compat, ops
from linear_jax.ops.common.chunking import doc_index
from linear_jax.ops.common.heads import default_scale, repeat_heads
from linear_jax.ops.linear_attention import normalised, with_ones_column
from linear_jax.parallel import zeco
from linear_jax.parallel.affine import affine_shard
from linear_jax.parallel.mesh import resolved_impl, run_on_mesh

DEFAULT_MODE = "saved"
STAGINGS = ("auto", "gemm", "zeco")
_OPS = {"simple_gla": ops.simple_gla, "gla": ops.gla}


def _einsum(spec, *xs):
    return jnp.einsum(spec, *xs, precision=lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)


def _resolve_staging(op, staging, impl, config, T_loc):
    if staging not in STAGINGS:
        raise ValueError(f"staging must be one of {STAGINGS}, got {staging!r}")
    name = resolved_impl(op, impl, T_loc, config)
    if staging == "zeco" and name != "chunk":
        raise ValueError(f"{op}: staging='zeco' needs the chunk form, but impl={impl!r} "
                         f"resolves to {name!r}")
    return "zeco" if staging == "auto" and name == "chunk" else (
        "gemm" if staging == "auto" else staging)


def decay_local(op, q, k, v, g, *, axis_name="seq", scale=None, initial_state=None,
                segment_ids=None, chunk_size=64, impl="auto", config=None, mode=DEFAULT_MODE,
                staging="auto"):
    """`op` ("simple_gla" | "gla") on the local shard of a sequence split along `axis_name`;
    call inside `shard_map`. Returns (o [B,T_loc,H,V], global final state [B,H,K,V])."""
    B, T, Hk, K = q.shape
    H = v.shape[2]
    scale = default_scale(scale, K)
    kind = ("identity" if segment_ids is None else "scalar") if g is None else (
        "scalar" if g.ndim == 3 else "vector")
    kw = dict(scale=scale, chunk_size=chunk_size, impl=impl, config=config)
    x = (q, k, v, g)

    if _resolve_staging(op, staging, impl, config, T) == "zeco":
        pre, post = zeco.stages(kind, scale=scale, chunk_size=chunk_size)
    else:
        def pre(x, seg):
            q, k, v, g = x
            # an explicit zero state typed like the inputs: the op's own zeros would be an
            # invariant scan carry, which shard_map's type check rejects
            S_zero = _compat.zeros_varying((B, H, K, v.shape[-1]), q, k, v, g)
            o_loc, N = _OPS[op](q, k, v, g, initial_state=S_zero, segment_ids=seg, **kw)
            return (o_loc, shard_q(q, g, H, scale, seg)), N, shard_map_of(kind, g, seg, N.shape)

        def post(x, seg, parts, S_in):
            o_loc, q_t = parts
            return (o_loc.astype(jnp.float32) + _einsum("bthk,bhkv->bthv", q_t, S_in)).astype(
                x[2].dtype)

    def rerun(x, seg, S_in):
        return _OPS[op](*x, initial_state=S_in, segment_ids=seg, **kw)

    return affine_shard(pre, post, kind, x, (B, H, K, v.shape[-1]), initial_state, segment_ids,
                        axis_name=axis_name, mode=mode, rerun=rerun)


def shard_q(q, g, H, scale, segment_ids):
    """Q~ [B,T,H,K] float32: scale * q * exp(inclusive shard-local cumsum of g), zero from the
    shard's first reset on."""
    qt = repeat_heads(q, H).astype(jnp.float32) * scale
    if g is not None:
        b = jnp.exp(jnp.cumsum(g.astype(jnp.float32), axis=1))
        qt = qt * (b[..., None] if g.ndim == 3 else b)
    if segment_ids is not None:
        qt = jnp.where((doc_index(segment_ids) == 0)[:, :, None, None], qt, 0.0)
    return qt


def shard_map_of(kind, g, segment_ids, state_shape):
    """M: exp(sum of the shard's gates), [B,H] ("scalar") or [B,H,K] ("vector"); 0 where the
    shard holds a reset; None for the identity."""
    if kind == "identity":
        return None
    if g is None:
        M = jnp.ones(state_shape[:2], jnp.float32)
    else:
        M = jnp.exp(jnp.sum(g.astype(jnp.float32), axis=1))
    if segment_ids is not None:
        keep = doc_index(segment_ids)[:, -1] == 0
        M = jnp.where(keep.reshape((-1,) + (1,) * (M.ndim - 1)), M, 0.0)
    return M


def _public(op, q, k, v, g, *, mesh, axis_name, batch_axes, head_axes, **kw):
    if mesh is None:
        return decay_local(op, q, k, v, g, axis_name=axis_name, **kw)
    init, seg = kw.pop("initial_state"), kw.pop("segment_ids")
    local = lambda q, k, v, g, **a: decay_local(op, q, k, v, g, **a, **kw)
    return run_on_mesh(local, mesh, (q, k, v, g), initial_state=init, segment_ids=seg,
                       seq_axis=axis_name, batch_axes=batch_axes, head_axes=head_axes,
                       kernel_op=(op, kw["impl"], kw["config"]))


def simple_gla(q, k, v, g, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None,
               scale=None, initial_state=None, segment_ids=None, chunk_size=64, impl="auto",
               config=None, mode=DEFAULT_MODE, staging="auto"):
    """Sequence-parallel `linear_jax.ops.simple_gla`.

    With `mesh=None`, call it inside `shard_map` on the local shards (sequence split along
    `axis_name`); with a `Mesh`, it builds the `shard_map` itself (`linear_jax.parallel.mesh`).
    `impl` and `config` go to the single-device op on each shard.
    Returns `(o, final_state)`; the final state is the global one, on every device of the axis.
    """
    return _public("simple_gla", q, k, v, g, mesh=mesh, axis_name=axis_name,
                   batch_axes=batch_axes, head_axes=head_axes, scale=scale,
                   initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size,
                   impl=impl, config=config, mode=mode, staging=staging)


def gla(q, k, v, g, *, axis_name="seq", mesh=None, batch_axes=None, head_axes=None, scale=None,
        initial_state=None, segment_ids=None, chunk_size=64, impl="auto", config=None,
        mode=DEFAULT_MODE, staging="auto"):
    """Sequence-parallel `linear_jax.ops.gla` (arguments as `simple_gla`)."""
    return _public("gla", q, k, v, g, mesh=mesh, axis_name=axis_name, batch_axes=batch_axes,
                   head_axes=head_axes, scale=scale, initial_state=initial_state,
                   segment_ids=segment_ids, chunk_size=chunk_size, impl=impl, config=config,
                   mode=mode, staging=staging)


def linear_attention(q, k, v, *, normalize=False, eps=1e-6, axis_name="seq", mesh=None,
                     batch_axes=None, head_axes=None, scale=None, initial_state=None,
                     segment_ids=None, chunk_size=64, impl="auto", config=None,
                     mode=DEFAULT_MODE, staging="auto"):
    """Sequence-parallel `linear_jax.ops.linear_attention` (arguments as `simple_gla`)."""
    V = v.shape[-1]
    o, S = simple_gla(q, k, with_ones_column(v) if normalize else v, None, axis_name=axis_name,
                      mesh=mesh, batch_axes=batch_axes, head_axes=head_axes, scale=scale,
                      initial_state=initial_state, segment_ids=segment_ids,
                      chunk_size=chunk_size, impl=impl, config=config, mode=mode,
                      staging=staging)
    return (normalised(o, V, eps, v.dtype) if normalize else o.astype(v.dtype)), S
