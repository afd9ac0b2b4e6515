"""A decoder-only language model over any stack of token mixers.

    h = embed(tokens) [* embed_scale] [+ pos_embed(position in its document)]
    for each layer: h = h + mixer(RMSNorm(h)); h = h + ffn(RMSNorm(h))     (pre-norm residual)
    logits = RMSNorm(h) E^T  (tied)  or  RMSNorm(h) W_head     [-> c tanh(logits / c)]

(`norm="none"`: every RMSNorm above is the identity.)

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
(docs/sequence_parallel.md). Parameters: V D (+ V D untied head) (+ max_positions D) + D + sum
over layers (2 D + mixer + ffn).

Learned positions (`max_positions`) count from each document's start (`segment_ids`); with a cache
they continue from a softmax-attention layer's, whose KV cache holds the position reached, so a
model with them decodes only with such a layer. A position past `max_positions` raises where it
is known and gives NaN logits under `jit`, as a full KV cache does.

Layers as a scan: consecutive layers of the same structure are held as one `Stack`
(`linear_jax.models.stack`), run as one `lax.scan` without a cache and layer by layer with one.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.layers import MIXERS, make_mixer
from linear_jax.layers.attention import Attention, documents
from linear_jax.layers.common import RMSNorm, param
from linear_jax.layers.ffn import MLP, MoE
from linear_jax.layers.shared_moe import SharedExpertMoE
from linear_jax.models.config import LMConfig
from linear_jax.models.stack import LAYERS_AXIS, Stack, periods

# LAYERS_AXIS, Stack and periods live in linear_jax.models.stack; callers import them from here too
__all__ = ["LAYERS_AXIS", "LM", "Block", "Stack", "periods"]


def _norm(c: LMConfig, **kw) -> RMSNorm | None:
    """A block or final norm; None where `LMConfig.norm` is "none" (the identity)."""
    return None if c.norm == "none" else RMSNorm(c.d_model, eps=c.norm_eps,
                                                 offset=c.norm_offset, **kw)


class Block(nnx.Module):
    def __init__(self, config: LMConfig, layer_idx: int, *, rngs: nnx.Rngs):
        c = config
        kw = dict(rngs=rngs, dtype=c.dtype and jnp.dtype(c.dtype), param_dtype=jnp.dtype(
            c.param_dtype))
        self.mixer_name = name = c.layer_mixers()[layer_idx]
        # MiniMax-01's block: (alpha, beta) of the mixer and of the ffn, None for pre-norm
        self.normed = (None if c.residual == "pre" else (c.scales(name), c.scales("ffn")))
        self.norm1 = _norm(c, **kw)
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
        self.norm2 = None if kind == "none" else _norm(c, **kw)
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
        x = h if self.norm1 is None else self.norm1(h)
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
        y, aux = self.ffn(h if self.norm2 is None else self.norm2(h))
        return h + y, cache, aux, v_first


class LM(nnx.Module):
    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.dtype = c.dtype and jnp.dtype(c.dtype)
        pdt = jnp.dtype(c.param_dtype)
        init = nnx.initializers.normal(c.init_std)
        self.embed = param(rngs, init, (c.vocab_size, c.d_model), ("vocab", "embed"), pdt)
        self.pos_embed = (param(rngs, init, (c.max_positions, c.d_model), (None, "embed"), pdt)
                          if c.max_positions else None)
        # built one by one, in order (the same draws as an unstacked model), then stacked by runs
        blocks = [Block(c, i, rngs=rngs) for i in range(c.num_layers)]
        graphdefs = [nnx.graphdef(b) for b in blocks]
        kinds = [graphdefs.index(g) for g in graphdefs]
        stacks, start = [], 0
        for period, repeats in periods(kinds):
            stacks.append(Stack(blocks[start:start + period * repeats], period))
            start += period * repeats
        self.stacks = nnx.List(stacks)
        self.norm = _norm(c, rngs=rngs, dtype=self.dtype, param_dtype=pdt)
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

    def _positions(self, shape, segment_ids, cache):
        """The learned embeddings [B, T, D] of the new tokens' positions in their documents
        (`attention.documents`), NaN past `max_positions`."""
        B, T = shape
        L = self.config.max_positions
        at = None
        if cache is not None:
            at = next((i for i in range(self.config.num_layers)
                       if isinstance(self.layer_mixer(i), Attention)), None)
            if at is None:
                raise ValueError("LM: learned positions (max_positions) continue from a softmax-"
                                 "attention layer's cache, and this model has none to decode "
                                 "with")
        index = 0 if at is None else cache[at]["index"]
        if T > L or (not isinstance(index, jax.core.Tracer) and int(index) + T > L):
            raise ValueError(f"LM: {T} token(s) from position {index} reach past the "
                             f"max_positions={L} learned positions")
        pos = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
        _, start = documents(pos, segment_ids, None if at is None else cache[at])
        return jnp.take(self.pos_embed[...], pos - start, axis=0, mode="fill",
                        fill_value=jnp.nan)

    # -- forward ---------------------------------------------------------------------------------
    def __call__(self, tokens, *, segment_ids=None, cache=None, seq_parallel=None,
                 positions=None):
        """Without a cache, each stack runs as one scan over its layers; with one (a list of one
        cache per layer, `init_cache` or a previous call's), layer by layer. `positions` [B, P]
        (int): logits [B, P, vocab] at those positions only, the final norm and the head applied
        to P rows instead of T (training on a few scored positions per row). Under `jit` a call
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
        if self.pos_embed is not None:
            h = h + self._positions(h.shape[:2], segment_ids, cache).astype(h.dtype)
        kw = dict(segment_ids=segment_ids, seq_parallel=seq_parallel)
        new, aux, start = [], jnp.zeros((), jnp.float32), 0
        # a scan's carry keeps its structure: v_first exists from the first layer on
        shares = any(b.value_residual for stack in self.stacks for b in stack.blocks)
        v_first = jnp.zeros_like(h) if shares else None
        for stack in self.stacks:
            if cache is None:
                h, aux, v_first, c = stack.scan(h, aux, v_first,
                                                remat=self.config.remat == "block", **kw)
            else:
                h, aux, v_first, c = stack.unrolled(h, aux, v_first,
                                                    cache[start:start + stack.num_layers], **kw)
            new.extend(c)
            start += stack.num_layers
        if positions is not None:
            if positions.ndim != 2 or positions.shape[0] != h.shape[0]:
                raise ValueError(f"positions must be [B, P] with B = {h.shape[0]}, got "
                                 f"positions{list(positions.shape)} for tokens"
                                 f"{list(tokens.shape)}")
            h = jnp.take_along_axis(h, positions[..., None].astype(jnp.int32), axis=1)
        if self.norm is not None:
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
