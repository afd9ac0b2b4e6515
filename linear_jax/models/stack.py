"""The layers of `linear_jax.models.lm.LM` as a scan: runs of same-structure blocks held with
their parameters stacked on a leading `layers` axis.

Consecutive layers of the same structure share one traced body: the layers are cut into runs of a
repeated period (`periods`: 12 GLA layers are one period of 1 repeated 12 times; `attn_every=4` is
a period of 4, three GLA layers and an attention one, repeated), and each run is a `Stack` whose
parameters carry a leading `layers` axis of its repeats (logical name "layers", which no sharding
rule maps: it stays unsharded). A call without a cache (training, evaluation, scoring) runs each
stack as one `lax.scan` over that axis, so the compiled program holds one copy of each distinct
period whatever `num_layers` is (compile time roughly constant in depth:
`experiments/benchmarks/compile_time.py`, `tests/models/test_scan.py`). A call with a cache
(prefill, decoding) runs the layers one after the other on their slices of the stacks, so every
layer's cache, a KV cache included, is updated in place (a scan would copy each layer's cache
in and out of the stacked carry at every token); `LM.unstacked()` gives each layer a stack of its
own first, so that a decoding step does not slice parameters out of the stacks either.

Each block is called `block(h, *, segment_ids, cache, seq_parallel, v_first)` and returns
`(h, cache, aux, v_first)` (`linear_jax.models.lm.Block`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

LAYERS_AXIS = "layers"      # the logical name of the stacked layer axis (never sharded)


def periods(kinds: Sequence[Hashable]) -> list[tuple[int, int]]:
    """Cuts a sequence of layer kinds into consecutive runs `(period, repeats)`, each
    `period * repeats` layers long: run r repeats kinds[s:s + period] where it starts (s).
    From the first layer on, the run covering the most layers among those that repeat at least
    twice (ties: the shorter period); layers that start no repeat are gathered into one run of
    repeats 1. E.g. a a a b a a a b a a -> [(4, 2), (1, 2)]."""
    kinds, n, out, i = list(kinds), len(kinds), [], 0
    while i < n:
        best = (1, 1)
        for p in range(1, (n - i) // 2 + 1):
            r = 1
            while i + (r + 1) * p <= n and kinds[i + r * p:i + (r + 1) * p] == kinds[i:i + p]:
                r += 1
            if r > 1 and r * p > best[0] * best[1]:
                best = (p, r)
        if best[1] == 1 and out and out[-1][1] == 1:
            out[-1] = (out[-1][0] + 1, 1)           # no repeat here either: extend the run
        else:
            out.append(best)
        i += best[0] * best[1]
    return out


class Stack(nnx.Module):
    """`repeats` consecutive copies of a period of blocks of the same structure, held as one
    period (`blocks`) whose parameters are stacked on a leading `layers` axis: layer
    `j * len(blocks) + k` of the stack is block k at index j of that axis."""

    def __init__(self, blocks: Sequence[nnx.Module], period: int):
        if not blocks or len(blocks) % period:
            raise ValueError(f"Stack: {len(blocks)} blocks are not repeats of a period of "
                             f"{period}")
        runs = [nnx.List(blocks[j:j + period]) for j in range(0, len(blocks), period)]
        graphdef = nnx.graphdef(runs[0])
        if any(nnx.graphdef(run) != graphdef for run in runs[1:]):
            raise ValueError("Stack: the repeats of the period differ in structure")
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(run) for run in runs))
        stacked = spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS_AXIS})
        self.blocks = nnx.merge(graphdef, stacked)
        self.repeats = len(runs)

    @property
    def num_layers(self) -> int:
        return self.repeats * len(self.blocks)

    def layer(self, j: int) -> nnx.List:
        """The period at index j of the layers axis, its parameters sliced out (a new module)."""
        graphdef, state = nnx.split(self.blocks)
        cut = lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(
            x, jax.ShapeDtypeStruct) else x[j]                  # an abstract model too
        return nnx.merge(graphdef, jax.tree.map(cut, state))

    def scan(self, h, aux, v_first, *, remat: bool = False, **kw):
        """Every layer of the stack without a cache, as one `lax.scan` over the layers axis;
        `remat`: the backward recomputes each period from its input (`LMConfig.remat`).
        Returns (h, aux, v_first, the caches the layers leave, one per layer)."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, layer_state):
            h, aux, v_first = carry
            caches = []
            for block in nnx.merge(graphdef, layer_state):
                y, cache, a, v_first = block(h, v_first=v_first, **kw)
                h, aux = y.astype(h.dtype), aux + a
                caches.append(cache)
            return (h, aux, v_first), caches

        if remat:
            body = jax.checkpoint(body, prevent_cse=False)     # a scan body needs no CSE guard
        (h, aux, v_first), caches = jax.lax.scan(body, (h, aux, v_first), state)
        per_layer = [jax.tree.map(lambda x, j=j: x[j], c) for j in range(self.repeats)
                     for c in caches]
        return h, aux, v_first, per_layer

    def unrolled(self, h, aux, v_first, caches, **kw):
        """Every layer one after the other with its own cache (a list, one per layer)."""
        new = []
        for j in range(self.repeats):
            for k, block in enumerate(self.layer(j)):
                h, cache, a, v_first = block(h, cache=caches[j * len(self.blocks) + k],
                                             v_first=v_first, **kw)
                aux = aux + a
                new.append(cache)
        return h, aux, v_first, new
