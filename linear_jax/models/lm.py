"""A decoder-only language model over any stack of token mixers.

    h = embed(tokens) [* embed_scale]
    for each layer: h = h + mixer(RMSNorm(h)); h = h + ffn(RMSNorm(h))     (pre-norm residual)
    logits = RMSNorm(h) E^T  (tied)  or  RMSNorm(h) W_head     [-> c tanh(logits / c)]

A value-residual mixer (RWKV-7) also reads v_first [B, T, D], the value of the model's first layer
of its kind, which the blocks carry along with h (zeros before that layer; no carry in a model
without one).

Initialisation (GPT-2 / fla): every weight normal(0, init_std), the output projections of the
residual branches (mixer W_o, MLP W_2) scaled by 1 / sqrt(2 num_layers), norms at 1.

`__call__(tokens, *, segment_ids=None, cache=None, seq_parallel=None) -> (logits, new_cache,
aux)`: tokens int [B, T] or real-valued [B, T, vocab] (read in by the embedding table as a
matrix); logits float32 [B, T, vocab]; the cache is a list of one entry per layer (`init_cache`);
aux is the MoE load-balancing loss averaged over MoE layers (0 without MoE), for the trainer to
weight. `seq_parallel` (`linear_jax.parallel.SeqParallel`) is handed to every mixer: their
time-mixing ops run split along T over its mesh axis, everything else is per token
(docs/sequence_parallel.md). Parameters: V D (+ V D untied head) + D + sum over layers
(2 D + mixer + ffn).

Layers as a scan. Consecutive layers of the same structure share one traced body: the layers are
cut into runs of a repeated period (`periods`: 12 GLA layers are one period of 1 repeated 12
times; `attn_every=4` is a period of 4, three GLA layers and an attention one, repeated), and each
run is a `Stack` whose parameters carry a leading `layers` axis of its repeats (logical name
"layers", which no sharding rule maps: it stays unsharded). A call without a cache (training,
evaluation, scoring) runs each stack as one `lax.scan` over that axis, so the compiled program
holds one copy of each distinct period whatever `num_layers` is (compile time roughly constant in
depth: `experiments/benchmarks/compile_time.py`, `tests/models/test_scan.py`). A call with a cache
(prefill, decoding) runs the layers one after the other on their slices of the stacks, so every
layer's cache, a KV cache included, is updated in place (a scan would copy each layer's cache
in and out of the stacked carry at every token); `unstacked()` gives each layer a stack of its
own first, so that a decoding step does not slice parameters out of the stacks either.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

from linear_jax.layers import MIXERS, make_mixer
from linear_jax.layers.attention import Attention
from linear_jax.layers.common import RMSNorm, param
from linear_jax.layers.ffn import MLP, MoE
from linear_jax.layers.shared_moe import SharedExpertMoE
from linear_jax.models.config import LMConfig

LAYERS_AXIS = "layers"      # the logical name of the stacked layer axis (never sharded)


class Block(nnx.Module):
    def __init__(self, config: LMConfig, layer_idx: int, *, rngs: nnx.Rngs):
        c = config
        kw = dict(rngs=rngs, dtype=c.dtype and jnp.dtype(c.dtype), param_dtype=jnp.dtype(
            c.param_dtype))
        self.mixer_name = name = c.layer_mixers()[layer_idx]
        # MiniMax-01's block: (alpha, beta) of the mixer and of the ffn, None for pre-norm
        self.normed = (None if c.residual == "pre" else (c.scales(name), c.scales("ffn")))
        self.norm1 = RMSNorm(c.d_model, eps=c.norm_eps, offset=c.norm_offset, **kw)
        common = dict(chunk_size=c.chunk_size, kernel_config=c.kernel_config,
                      num_layers=c.num_layers, layer_idx=layer_idx, std=c.init_std,
                      first_of_kind=c.layer_mixers().index(name) == layer_idx)
        # LMConfig.impl is an op impl: the linear mixers' only (a mixer without `impl` never
        # receives it, make_mixer filters the common arguments)
        if getattr(MIXERS[name], "OP_IMPL", True):
            common["impl"] = c.impl
        self.mixer = make_mixer(name, c.d_model, c.num_heads, options=c.options(name),
                                **common, **kw)
        # a mixer reading the first layer's value (RWKV-7) is called through `with_value`
        self.value_residual = getattr(self.mixer, "value_residual", False)
        ffn_kw = dict(num_layers=c.num_layers, std=c.init_std, **kw)
        kind = c.layer_ffn(layer_idx)
        # ffn="none": the block is norm + mixer only (Mamba's), with no second norm to carry
        self.norm2 = None if kind == "none" else RMSNorm(c.d_model, eps=c.norm_eps,
                                                         offset=c.norm_offset, **kw)
        moe = partial(SharedExpertMoE, shared_width=c.moe_shared) if c.moe_shared else MoE
        self.ffn = (None if kind == "none" else
                    moe(c.d_model, c.moe_width, num_experts=c.num_experts, top_k=c.top_k,
                        **dict(c.moe_options), **ffn_kw)
                    if kind == "moe" else MLP(c.d_model, c.ff_width, activation=c.ffn_activation,
                                              use_bias=c.ffn_bias, **ffn_kw))

    def __call__(self, h, *, segment_ids=None, cache=None, seq_parallel=None, v_first=None):
        """(h, cache, aux, v_first): v_first [B, T, D] is the value of the model's first
        value-residual layer, carried from block to block (None in a model without one)."""
        kw = dict(segment_ids=segment_ids, cache=cache, seq_parallel=seq_parallel)
        x = self.norm1(h)
        if self.value_residual:
            y, cache, v = self.mixer.with_value(x, v_first, **kw)
            v_first = v.astype(v_first.dtype)
        else:
            y, cache = self.mixer(x, **kw)
        if self.normed is not None:
            (a1, b1), (a2, b2) = self.normed
            h = self.norm2(a1 * x + b1 * y)
            y, aux = self.ffn(h)
            return a2 * h + b2 * y, cache, aux, v_first
        h = h + y
        if self.ffn is None:
            return h, cache, jnp.zeros((), jnp.float32), v_first
        y, aux = self.ffn(self.norm2(h))
        return h + y, cache, aux, v_first


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

    def __init__(self, blocks: Sequence[Block], period: int):
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

    def scan(self, h, aux, v_first, **kw):
        """Every layer of the stack without a cache, as one `lax.scan` over the layers axis.
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


class LM(nnx.Module):
    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.dtype = c.dtype and jnp.dtype(c.dtype)
        pdt = jnp.dtype(c.param_dtype)
        init = nnx.initializers.normal(c.init_std)
        self.embed = param(rngs, init, (c.vocab_size, c.d_model), ("vocab", "embed"), pdt)
        # built one by one, in order (the same draws as an unstacked model), then stacked by runs
        blocks = [Block(c, i, rngs=rngs) for i in range(c.num_layers)]
        graphdefs = [nnx.graphdef(b) for b in blocks]
        kinds = [graphdefs.index(g) for g in graphdefs]
        stacks, start = [], 0
        for period, repeats in periods(kinds):
            stacks.append(Stack(blocks[start:start + period * repeats], period))
            start += period * repeats
        self.stacks = nnx.List(stacks)
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs, dtype=self.dtype,
                            param_dtype=pdt, offset=c.norm_offset)
        self.head = None if c.tie_embeddings else param(rngs, init, (c.d_model, c.vocab_size),
                                                        ("embed", "vocab"), pdt)
        self.num_moe = sum(c.layer_ffn(i) == "moe" for i in range(c.num_layers))

    # -- layers ----------------------------------------------------------------------------------
    def _locate(self, i: int) -> tuple[Stack, int, int]:
        """(stack, index on its layers axis, position in its period) of layer i."""
        if not 0 <= i < self.config.num_layers:
            raise IndexError(f"layer {i} of a {self.config.num_layers}-layer model")
        for stack in self.stacks:
            if i < stack.num_layers:
                return stack, i // len(stack.blocks), i % len(stack.blocks)
            i -= stack.num_layers
        raise AssertionError("unreachable")

    def layer(self, i: int) -> Block:
        """Layer i as a `Block` of its own (its parameters sliced out of its stack: a copy, for
        inspection; training updates the stacks)."""
        stack, j, k = self._locate(i)
        return stack.layer(j)[k]

    def layer_mixer(self, i: int):
        """The mixer of layer i as its stack holds it: its static attributes (sizes, options) and
        `init_cache` are layer i's, its parameters are stacked (use `layer(i)` to call it)."""
        stack, _, k = self._locate(i)
        return stack.blocks[k].mixer

    def unstacked(self) -> LM:
        """This model with every layer in a stack of its own (the same parameters, copied once):
        what decoding should run. A call with a cache walks the layers one by one, and slicing a
        layer out of a deeper stack copies its parameters at every call, which at one token per
        call is most of the work (`linear_jax.models.generate` unstacks for you)."""
        if all(s.num_layers == 1 for s in self.stacks):
            return self
        graphdef, state = nnx.split(self)
        new = nnx.merge(graphdef, state)               # new Variables over the same arrays
        new.stacks = nnx.List([Stack([block], 1) for stack in self.stacks
                               for j in range(stack.repeats) for block in stack.layer(j)])
        return new

    def _kv_layers(self) -> list[int]:
        """The softmax-attention layers (`Attention` and its variants, MLA's latent cache
        included) whose KV cache grows with the context (`max_len` slots; a sliding window's is
        constant)."""
        return [i for i in range(self.config.num_layers) if isinstance(
            m := self.layer_mixer(i), Attention) and not m.rolling]

    def init_cache(self, batch_size: int, max_len: int | None = None,
                   dtype=jnp.float32) -> list:
        """One cache per layer. Softmax-attention layers without a sliding window preallocate a
        KV cache of `max_len` positions (the prompt plus every token to generate), which they
        need; other models ignore it. Running past `max_len` raises where it can be seen
        (eagerly, or a call longer than the cache) and gives NaN logits under `jit` (see
        `__call__`)."""
        at = self._kv_layers()
        if max_len is None and at:
            raise ValueError(f"init_cache: layer(s) {at} are softmax attention, whose KV cache "
                             f"needs max_len (the prompt plus the tokens to generate)")
        return [self.layer_mixer(i).init_cache(batch_size, dtype, max_len=max_len)
                for i in range(self.config.num_layers)]

    def _kv_overflow(self, cache, T: int):
        """For a call of T tokens on `cache`: raises when an attention layer's KV cache cannot
        take them and that is known at trace time (T alone too long, or a concrete write
        position); else None, or a traced bool that is True when a traced position overflows."""
        over = None
        for i in self._kv_layers():
            size, index = cache[i]["doc"].shape[1], cache[i]["index"]
            concrete = not isinstance(index, jax.core.Tracer)
            if T > size or (concrete and int(index) + T > size):
                at = f"position {int(index)}" if concrete else "a traced position"
                raise ValueError(f"layer {i} ({self.config.layer_mixers()[i]}): {T} new "
                                 f"token(s) at {at} do not fit its KV cache of "
                                 f"max_len={size}; size it with init_cache(batch_size, "
                                 f"max_len=...)")
            if not concrete:
                over = (index + T > size) if over is None else over | (index + T > size)
        return over

    # -- forward ---------------------------------------------------------------------------------
    def __call__(self, tokens, *, segment_ids=None, cache=None, seq_parallel=None):
        """Without a cache, each stack runs as one scan over its layers; with one (a list of one
        cache per layer, `init_cache` or a previous call's), layer by layer. Under `jit` a call
        that would write past an attention layer's KV cache (whose position is traced) returns
        NaN logits rather than wrong ones; outside `jit`, and whenever T alone is too long, it
        raises."""
        if cache is not None and len(cache) != self.config.num_layers:
            raise ValueError(f"cache holds {len(cache)} entries, the model has "
                             f"{self.config.num_layers} layers (use init_cache)")
        over = None if cache is None else self._kv_overflow(cache, tokens.shape[1])
        # Real-valued inputs [B, T, vocab] (a regression task's tokens) go through the embedding
        # table as a linear read-in, of which the lookup of an id is the one-hot case.
        h = (jnp.einsum("btv,vd->btd", tokens, self.embed[...].astype(tokens.dtype))
             if jnp.issubdtype(tokens.dtype, jnp.floating) else
             jnp.take(self.embed[...], tokens, axis=0))
        if self.dtype is not None:
            h = h.astype(self.dtype)
        if self.config.embed_scale is not None:
            h = h * jnp.asarray(self.config.embed_scale, h.dtype)
        kw = dict(segment_ids=segment_ids, seq_parallel=seq_parallel)
        new, aux, start = [], jnp.zeros((), jnp.float32), 0
        # a scan's carry keeps its structure: v_first exists from the first layer on
        shares = any(b.value_residual for stack in self.stacks for b in stack.blocks)
        v_first = jnp.zeros_like(h) if shares else None
        for stack in self.stacks:
            if cache is None:
                h, aux, v_first, c = stack.scan(h, aux, v_first, **kw)
            else:
                h, aux, v_first, c = stack.unrolled(h, aux, v_first,
                                                    cache[start:start + stack.num_layers], **kw)
            new.extend(c)
            start += stack.num_layers
        h = self.norm(h)
        w = self.embed[...].T if self.head is None else self.head[...]
        logits = jnp.einsum("btd,dv->btv", h, w.astype(h.dtype),
                            preferred_element_type=jnp.float32)
        if self.config.logit_soft_cap is not None:
            cap = self.config.logit_soft_cap
            logits = cap * jnp.tanh(logits / cap)
        if over is not None:
            logits = jnp.where(over, jnp.nan, logits)
        return logits, new, aux / max(self.num_moe, 1)
