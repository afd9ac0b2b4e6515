"""A decoder-only language model over any stack of token mixers.

    h = embed(tokens)
    for each layer: h = h + mixer(RMSNorm(h)); h = h + ffn(RMSNorm(h))     (pre-norm residual)
    logits = RMSNorm(h) E^T  (tied)  or  RMSNorm(h) W_head

Initialisation (GPT-2 / fla): every weight normal(0, init_std), the output projections of the
residual branches (mixer W_o, MLP W_2) scaled by 1 / sqrt(2 num_layers), norms at 1.

`__call__(tokens, *, segment_ids=None, cache=None, seq_parallel=None) -> (logits, new_cache,
aux)`: logits float32 [B, T, vocab]; the cache is one entry per layer (`init_cache`); aux is the MoE
load-balancing loss averaged over MoE layers (0 without MoE), for the trainer to weight.
`seq_parallel` (`linear_jax.parallel.SeqParallel`) is handed to every mixer: their time-mixing ops
run split along T over its mesh axis, everything else is per token (docs/sequence_parallel.md).
Parameters: V D (+ V D untied head) + D + sum over layers (2 D + mixer + ffn).
"""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
from flax import nnx

from linear_jax.layers import make_mixer
from linear_jax.layers.common import RMSNorm, param
from linear_jax.layers.ffn import MLP, MoE
from linear_jax.layers.shared_moe import SharedExpertMoE
from linear_jax.models.config import LMConfig


class Block(nnx.Module):
    def __init__(self, config: LMConfig, layer_idx: int, *, rngs: nnx.Rngs):
        c = config
        kw = dict(rngs=rngs, dtype=c.dtype and jnp.dtype(c.dtype), param_dtype=jnp.dtype(
            c.param_dtype))
        self.mixer_name = c.layer_mixers()[layer_idx]
        # MiniMax-01's block: (alpha, beta) of the mixer and of the ffn, None for pre-norm
        self.normed = (None if c.residual == "pre" else
                       (c.scales(self.mixer_name), c.scales("ffn")))
        self.norm1 = RMSNorm(c.d_model, eps=c.norm_eps, offset=c.norm_offset, **kw)
        self.mixer = make_mixer(self.mixer_name, c.d_model, c.num_heads, chunk_size=c.chunk_size,
                                impl=c.impl, kernel_config=c.kernel_config,
                                num_layers=c.num_layers, layer_idx=layer_idx, std=c.init_std,
                                **c.options(self.mixer_name), **kw)
        ffn_kw = dict(num_layers=c.num_layers, std=c.init_std, **kw)
        kind = c.layer_ffn(layer_idx)
        # ffn="none": the block is norm + mixer only (Mamba's), with no second norm to carry
        self.norm2 = None if kind == "none" else RMSNorm(c.d_model, eps=c.norm_eps,
                                                         offset=c.norm_offset, **kw)
        moe = partial(SharedExpertMoE, shared_width=c.moe_shared) if c.moe_shared else MoE
        self.ffn = (None if kind == "none" else
                    moe(c.d_model, c.ff_width, num_experts=c.num_experts, top_k=c.top_k, **ffn_kw)
                    if kind == "moe" else MLP(c.d_model, c.ff_width, **ffn_kw))

    def __call__(self, h, *, segment_ids=None, cache=None, seq_parallel=None):
        if self.normed is not None:
            return self.normed_residual(h, segment_ids, cache, seq_parallel)
        y, cache = self.mixer(self.norm1(h), segment_ids=segment_ids, cache=cache,
                              seq_parallel=seq_parallel)
        h = h + y
        if self.ffn is None:
            return h, cache, jnp.zeros((), jnp.float32)
        y, aux = self.ffn(self.norm2(h))
        return h + y, cache, aux


    def normed_residual(self, h, segment_ids, cache, seq_parallel):
        (a1, b1), (a2, b2) = self.normed
        h = self.norm1(h)
        y, cache = self.mixer(h, segment_ids=segment_ids, cache=cache, seq_parallel=seq_parallel)
        h = self.norm2(a1 * h + b1 * y)
        y, aux = self.ffn(h)
        return a2 * h + b2 * y, cache, aux


class LM(nnx.Module):
    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.dtype = c.dtype and jnp.dtype(c.dtype)
        pdt = jnp.dtype(c.param_dtype)
        init = nnx.initializers.normal(c.init_std)
        self.embed = param(rngs, init, (c.vocab_size, c.d_model), ("vocab", "embed"), pdt)
        self.blocks = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs, dtype=self.dtype,
                            param_dtype=pdt, offset=c.norm_offset)
        self.head = None if c.tie_embeddings else param(rngs, init, (c.d_model, c.vocab_size),
                                                        ("embed", "vocab"), pdt)
        self.num_moe = sum(c.layer_ffn(i) == "moe" for i in range(c.num_layers))

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> list:
        """One cache per layer; attention layers preallocate `max_len` positions."""
        return [b.mixer.init_cache(batch_size, dtype, max_len=max_len) for b in self.blocks]

    def __call__(self, tokens, *, segment_ids=None, cache=None, seq_parallel=None):
        h = jnp.take(self.embed[...], tokens, axis=0)
        if self.dtype is not None:
            h = h.astype(self.dtype)
        caches = [None] * len(self.blocks) if cache is None else cache
        new, aux = [], jnp.zeros((), jnp.float32)
        for block, c in zip(self.blocks, caches, strict=True):
            h, c, a = block(h, segment_ids=segment_ids, cache=c, seq_parallel=seq_parallel)
            new.append(c)
            aux = aux + a
        h = self.norm(h)
        w = self.embed[...].T if self.head is None else self.head[...]
        logits = jnp.einsum("btd,dv->btv", h, w.astype(h.dtype),
                            preferred_element_type=jnp.float32)
        if self.config.logit_soft_cap is not None:
            cap = self.config.logit_soft_cap
            logits = cap * jnp.tanh(logits / cap)
        return logits, new, aux / max(self.num_moe, 1)
