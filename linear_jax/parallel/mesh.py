"""Running a local sequence-parallel function over a `Mesh`: the `shard_map` and its specs.

Layout: every `[B, T, H, ...]` input and the output are sharded as `P(batch, seq, heads)`;
`segment_ids [B, T]` as `P(batch, seq)`; `initial_state` and the final state `[B, H, K, V]` as
`P(batch, heads)`, i.e. replicated along `seq` (the final state is the global one, the same on
every device of the axis). `batch_axes` defaults to the mesh axes named "data" and "fsdp",
`head_axes` to "tensor" (the recurrences are per head, so head sharding needs no communication).
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from linear_jax import _compat
from linear_jax.ops import registry

BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def _axes(mesh, given, default):
    names = tuple(n for n in default if n in mesh.axis_names) if given is None else tuple(given)
    return None if not names else (names[0] if len(names) == 1 else names)


def specs(mesh, seq_axis="seq", batch_axes=None, head_axes=None):
    """(spec of a [B,T,H,...] array, of segment_ids [B,T], of a state [B,H,K,V])."""
    if seq_axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {seq_axis!r}: its axes are {mesh.axis_names}")
    b, h = _axes(mesh, batch_axes, BATCH_AXES), _axes(mesh, head_axes, HEAD_AXES)
    return P(b, seq_axis, h), P(b, seq_axis), P(b, h)


def resolved_impl(op, impl, T_loc, config=None) -> str:
    """The implementation the single-device op will run on a shard of T_loc tokens: "recurrent",
    "chunk" or "pallas:<backend>" (`linear_jax.ops.registry.resolve`)."""
    return registry.resolve(op, impl, T_loc, config).impl


def uses_kernel(op, impl, T_loc, config=None) -> bool:
    """Whether `impl` resolves to a Pallas kernel. Their `pallas_call`s declare outputs without
    vma types, which a checked `shard_map` rejects, so the wrapper turns checking off for them
    (the parallel code is correct either way; tests cover both)."""
    return registry.resolve(op, impl, T_loc, config).is_kernel


def run_on_mesh(local_fn, mesh, seq_args, *, initial_state=None, segment_ids=None,
                seq_axis="seq", batch_axes=None, head_axes=None, with_state=True,
                kernel_op=None, **static):
    """Calls `local_fn(*seq_args, initial_state=, segment_ids=, axis_name=seq_axis, **static)`
    under `shard_map` over `mesh`. `seq_args` are `[B, T, H, ...]` arrays or None.
    `kernel_op=(op, impl, config)`: check vma types unless `impl` resolves to a kernel of `op`.
    Returns what `local_fn` returns: `(o [B,T,H,V], final_state [B,H,K,V])`, or `o` alone
    with `with_state=False`."""
    x_spec, seg_spec, state_spec = specs(mesh, seq_axis, batch_axes, head_axes)
    n = mesh.shape[seq_axis]
    T = next(a for a in seq_args if a is not None).shape[1]
    if T % n:
        raise ValueError(f"the sequence length T={T} must be a multiple of the size {n} of the "
                         f"mesh axis {seq_axis!r}")
    present = [i for i, a in enumerate(seq_args) if a is not None]
    check = True
    if kernel_op is not None:
        op, impl, config = kernel_op
        check = not uses_kernel(op, impl, T // n, config)

    def body(arrays, init, seg):
        full = [None] * len(seq_args)
        for i, a in zip(present, arrays, strict=True):
            full[i] = a
        return local_fn(*full, initial_state=init, segment_ids=seg, axis_name=seq_axis, **static)

    arrays = [seq_args[i] for i in present]
    in_specs = ([x_spec] * len(arrays), None if initial_state is None else state_spec,
                None if segment_ids is None else seg_spec)
    out_specs = (x_spec, state_spec) if with_state else x_spec
    f = _compat.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check=check)
    return f(arrays, initial_state, segment_ids)
