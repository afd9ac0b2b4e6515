"""Sequence parallelism inside a model: `SeqParallel`, and the four functions through which every
layer reaches its time-mixing op.

    sp = SeqParallel(mesh)                                  # T split over the mesh axis "seq"
    logits, _, aux = model(tokens, segment_ids=seg, seq_parallel=sp)

`seq_parallel` is an ordinary call argument, passed down explicitly from `LM.__call__` through each
block to its mixer; there is no global state and the model itself holds no mesh (the same model
runs on one device with `seq_parallel=None`). Everything in a model except its token mixers acts
on one token at a time (projections, norms, MLPs, MoE routing, the loss), so under `jit` those
follow the layout of the batch, `P(batch, "seq")`: activations stay split along T and parameters
are replicated along `seq` (the sharding rules never map a parameter onto it). Only what couples
time steps needs communication, and the layers call it only through:

  `recurrence(op, *args, seq_parallel=, **kw)`  the linear recurrences: `linear_jax.ops.<op>`
      when `seq_parallel` is None or its axis has size 1, else the sequence-parallel form its
      registry record names (`linear_jax.ops.registry`; today `linear_attention`, `simple_gla`,
      `gla`, `delta_rule`, `gated_delta_rule`, `ssd`, `kda`, `rwkv7`, `mamba3`, `mamba3_mimo`,
      `log_linear_simple_gla`, `log_linear_gated_delta_rule`, `diagonal_scan`, `hgrn`) in its own
      `shard_map` (one all-gather forward, one backward; two each for log-linear Gated
      DeltaNet); `impl` and `config` reach the single-device op either way;
  `short_conv(...)`    `ops.short_conv`, or the halo convolution its record names (one
      `ppermute` of W-1 tokens);
  `attention(...)`     causal softmax attention over all-gathered K, V (LASP-2H), in the
      contiguous layout or, `attention_layout="zigzag"`, permuted to zigzag around the layer for
      a balanced causal workload;
  `latent_attention(...)`  MLA: the latents all-gathered instead of K, V and expanded on every
      device (`linear_jax.parallel.latent`), in either layout.

Each call builds its `shard_map` with inputs `P(batch, seq, heads)`. The batch and head axes are
the mesh's `data`/`fsdp` and `tensor` axes (or the ones given), dropped for an array whose
dimension they do not divide (e.g. one group of Mamba-2's B, C on a 2-way `tensor` axis): the
compiler then reshards around the `shard_map`. A mixer without a parallel form raises
`NotImplementedError` when called with an active `seq_parallel` (`supports_seq_parallel` in
`linear_jax.layers` says which, before anything is traced).
"""

from __future__ import annotations

import dataclasses
import math

from jax.sharding import Mesh

from linear_jax import ops
from linear_jax.ops import registry
from linear_jax.parallel import latent, softmax
from linear_jax.parallel.affine import MODES
from linear_jax.parallel.mesh import BATCH_AXES, HEAD_AXES


@dataclasses.dataclass(frozen=True)
class SeqParallel:
    """Where a model's time axis is split: `mesh` and its axis `axis_name`.

    `batch_axes` / `head_axes`: the mesh axes the batch and head dimensions are split over
    (default: those of `data`, `fsdp` / of `tensor` the mesh has). `attention_layout`:
    "contiguous" or "zigzag" for the softmax-attention layers. `mode`: the backward of the
    linear ops ("saved", "rerun" or "autodiff", see `linear_jax.parallel.affine`).
    """

    mesh: Mesh
    axis_name: str = "seq"
    batch_axes: tuple[str, ...] | None = None
    head_axes: tuple[str, ...] | None = None
    attention_layout: str = "contiguous"
    mode: str = "saved"

    def __post_init__(self):
        names = self.mesh.axis_names
        if self.axis_name not in names:
            raise ValueError(f"SeqParallel: the mesh has no axis {self.axis_name!r}: its axes "
                             f"are {names}")
        pick = lambda given, default: tuple(a for a in default if a in names) \
            if given is None else tuple(given)
        object.__setattr__(self, "batch_axes", pick(self.batch_axes, BATCH_AXES))
        object.__setattr__(self, "head_axes", pick(self.head_axes, HEAD_AXES))
        bad = [a for a in self.batch_axes + self.head_axes if a not in names]
        if bad or self.axis_name in self.batch_axes + self.head_axes:
            raise ValueError(f"SeqParallel: batch_axes {self.batch_axes} and head_axes "
                             f"{self.head_axes} must be other axes of the mesh {names}")
        if self.attention_layout not in softmax.LAYOUTS:
            raise ValueError(f"SeqParallel: attention_layout must be one of "
                             f"{softmax.LAYOUTS}, got {self.attention_layout!r}")
        if self.mode not in MODES:
            raise ValueError(f"SeqParallel: mode must be one of {MODES}, got {self.mode!r}")

    @property
    def size(self) -> int:
        """The number of shards of the time axis."""
        return int(self.mesh.shape[self.axis_name])

    def _split(self, axes, dims) -> tuple[str, ...]:
        n = math.prod(self.mesh.shape[a] for a in axes)
        return axes if all(d % n == 0 for d in dims) else ()

    def axes_for(self, *arrays) -> dict:
        """`batch_axes=`, `head_axes=` for a `shard_map` over arrays `[B, T, H, ...]` (None
        entries and arrays of rank < 2 ignored): each dropped when it does not divide them."""
        xs = [a for a in arrays if a is not None and a.ndim >= 2]
        return {"batch_axes": self._split(self.batch_axes, [a.shape[0] for a in xs]),
                "head_axes": self._split(self.head_axes, [a.shape[2] for a in xs if a.ndim >= 3])}


def is_active(seq_parallel: SeqParallel | None) -> bool:
    """Whether a call must run sequence-parallel (a `SeqParallel` over more than one shard)."""
    return seq_parallel is not None and seq_parallel.size > 1


def unsupported(layer, seq_parallel) -> None:
    """Raises for a layer without a sequence-parallel form called with an active one."""
    if is_active(seq_parallel):
        raise NotImplementedError(f"{type(layer).__name__} has no sequence-parallel form; "
                                  f"run it with seq_parallel=None (a mesh axis "
                                  f"{seq_parallel.axis_name!r} of size 1)")


def _parallel_form(op: str):
    rec = registry.record(op)
    if rec.seq_parallel is None:
        raise NotImplementedError(f"{op} has no sequence-parallel form; run it with "
                                  f"seq_parallel=None (a mesh axis of size 1)")
    return registry.load(rec.seq_parallel)


def recurrence(op: str, *args, seq_parallel: SeqParallel | None = None, **kw):
    """`linear_jax.ops.<op>(*args, **kw)`, or with an active `seq_parallel` the sequence-parallel
    form of `op`'s registry record over its mesh (same arguments, same results). Arrays of the
    recurrences are `[B, T, H, ...]`: their batch and head axes pick the mesh axes."""
    registry.record(op)                                  # an unknown op raises, whatever the mesh
    if not is_active(seq_parallel):
        return getattr(ops, op)(*args, **kw)
    sp = seq_parallel
    return _parallel_form(op)(*args, mesh=sp.mesh, axis_name=sp.axis_name, mode=sp.mode,
                              **sp.axes_for(*args), **kw)


def short_conv(x, weight, bias=None, *, activation=None, initial_state=None, segment_ids=None,
               impl="auto", seq_parallel: SeqParallel | None = None):
    """`linear_jax.ops.short_conv`, or with an active `seq_parallel` the halo convolution over
    its mesh. Returns (y [B,T,D], the cache after the whole sequence [B,W-1,D] float32)."""
    kw = dict(activation=activation, initial_state=initial_state, segment_ids=segment_ids,
              impl=impl)
    if not is_active(seq_parallel):
        return ops.short_conv(x, weight, bias, **kw)
    sp = seq_parallel
    batch = sp.axes_for(x)["batch_axes"]
    return _parallel_form("short_conv")(x, weight, bias, mesh=sp.mesh, axis_name=sp.axis_name,
                                        batch_axes=batch, **kw)


def attention(q, k, v, *, seq_parallel: SeqParallel, scale=None, segment_ids=None,
              window=None, block_size=None):
    """Causal softmax attention (GQA, optional sliding window or in-document blocks, packed
    documents) over `seq_parallel`'s mesh; q [B,T,H,D], k, v [B,T,Hkv,D] in sequence order.
    With `attention_layout="zigzag"` the inputs are permuted to zigzag order and the output back
    (under the sequence sharding the compiler turns each permutation into an exchange)."""
    sp = seq_parallel
    return softmax.attention(q, k, v, mesh=sp.mesh, axis_name=sp.axis_name,
                             layout=sp.attention_layout, scale=scale, segment_ids=segment_ids,
                             window=window, block_size=block_size, **sp.axes_for(q, k, v))


def latent_attention(q, latents, params, *, expand, seq_parallel: SeqParallel, scale=None,
                     segment_ids=None):
    """Multi-head latent attention over `seq_parallel`'s mesh: q [B,T,H,D] against the K, V that
    `expand(params, latents)` makes from the all-gathered latents [B,T,L] (in sequence order;
    zigzag as `attention`). The heads stay whole: the up-projection `params` are replicated."""
    sp = seq_parallel
    return latent.latent_attention(q, latents, params, expand=expand, mesh=sp.mesh,
                                   axis_name=sp.axis_name, layout=sp.attention_layout,
                                   scale=scale, segment_ids=segment_ids,
                                   batch_axes=sp.axes_for(q)["batch_axes"])
