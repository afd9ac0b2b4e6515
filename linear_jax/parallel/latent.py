"""Sequence-parallel multi-head latent attention (MLA, DeepSeek-V2): gather the latents, expand
locally.

MLA's keys and values are a per-token expansion of one compressed latent (c, and the rope part
of the key shared by the heads), `kv_rank + r` numbers against `2 H d` for K and V. So each device
all-gathers the latents along the sequence (ONE collective: c and k_rope travel in one array),
expands them to every head's K and V through the replicated up-projection, and attends with its
local queries under the mask of the global positions (`softmax.global_mask`: causal, packed
documents, window, blocks). Autodiff transposes the gather into a reduce-scatter of the latents'
cotangent; the up-projection's gradient is summed over the axis by `shard_map`.

The expansion runs on all T positions on every device (`kv_rank H (n + d_v)` per position): the
price of moving the latents rather than K and V. Layouts as `linear_jax.parallel.softmax`
("contiguous" or "zigzag", which `mesh=` permutes in and out). The heads are not split over a
tensor axis here: the up-projection's weight is replicated, so it makes every head.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from linear_jax import _compat
from linear_jax.parallel.mesh import BATCH_AXES, _axes
from linear_jax.parallel.softmax import LAYOUTS, from_zigzag, global_mask, to_zigzag


def latent_attention_local(q, latents, params, *, expand, axis_name="seq", layout="contiguous",
                           scale=None, segment_ids=None, window=None, block_size=None):
    """Causal attention of the local queries q [B,T_loc,H,D] against K, V expanded from the
    latents of the whole sequence; call inside `shard_map`. latents [B,T_loc,L] (c and the
    roped shared key part, concatenated); `expand(params, latents [B,T,L]) -> (k [B,T,H,D],
    v [B,T,H,D])`. Masks as `softmax.attention_local`. Returns o [B,T_loc,H,D] in q's dtype."""
    k, v = expand(params, lax.all_gather(latents, axis_name, axis=1, tiled=True))
    mask = global_mask(q.shape[1], axis_name=axis_name, layout=layout, segment_ids=segment_ids,
                       window=window, block_size=block_size)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def latent_attention(q, latents, params, *, expand, axis_name="seq", mesh=None,
                     batch_axes=None, layout="contiguous", permute=True, scale=None,
                     segment_ids=None, window=None, block_size=None):
    """Sequence-parallel MLA. q [B,T,H,D]; latents [B,T,L]; `params` (a pytree, replicated)
    and `expand` as `latent_attention_local`; segment_ids [B,T] or None.

    With `mesh=` it builds the `shard_map` (q split `P(batch, axis_name)`, latents and ids
    likewise, params replicated) and takes and returns arrays in sequence order, permuting to
    and from zigzag order for `layout="zigzag"` unless `permute=False` (as
    `linear_jax.parallel.attention`). With `mesh=None` call it inside your `shard_map` on the
    local shards, in `layout` order. Returns o [B,T,H,D]."""
    kw = dict(expand=expand, layout=layout, scale=scale, window=window, block_size=block_size)
    if mesh is None:
        return latent_attention_local(q, latents, params, axis_name=axis_name,
                                      segment_ids=segment_ids, **kw)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n, T = mesh.shape[axis_name], q.shape[1]
    if T % n:
        raise ValueError(f"the sequence length T={T} must be a multiple of the size {n} of the "
                         f"mesh axis {axis_name!r}")
    zig = layout == "zigzag" and permute
    z = (lambda a: None if a is None else to_zigzag(a, n)) if zig else (lambda a: a)
    split = P(_axes(mesh, batch_axes, BATCH_AXES), axis_name)

    def body(q, latents, params, seg):
        return latent_attention_local(q, latents, params, axis_name=axis_name, segment_ids=seg,
                                      **kw)

    f = _compat.shard_map(body, mesh=mesh, out_specs=split, in_specs=(
        split, split, P(), None if segment_ids is None else split))
    o = f(z(q), z(latents), params, z(segment_ids))
    return from_zigzag(o, n) if zig else o
