"""A bidirectional encoder with a classification head, over LION attention (`layers.lion`).

    h = embed(tokens)
    for each layer: h = h + LION(RMSNorm(h)); h = h + MLP(RMSNorm(h))      (pre-norm residual)
    logits = mean_t(RMSNorm(h) over the tokens of `mask`) W_cls + b       [B, num_classes]

Each row is one example; `mask [B, T]` (True: a real token) keeps padding out of the pooled
mean and, as a segment of its own, out of every token's attention. Parameters: V D + D + sum over
layers (2 D + LION + 3 D F) + D C + C.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from linear_jax.layers.common import RMSNorm, dense, param
from linear_jax.layers.ffn import MLP
from linear_jax.layers.lion import DECAYS, LION


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    num_classes: int
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    decay: str = "s"                 # LION-LIT "lit", LION-D "d", LION-S "s"
    d_ff: int | None = None          # default: 8/3 d_model rounded up to a multiple of 8
    init_std: float = 0.02
    norm_eps: float = 1e-6
    chunk_size: int = 64
    impl: str = "auto"

    def __post_init__(self):
        for v, what in ((self.vocab_size, "vocab_size"), (self.num_classes, "num_classes"),
                        (self.d_model, "d_model"), (self.num_layers, "num_layers"),
                        (self.num_heads, "num_heads")):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"EncoderConfig: {what} must be a positive int, got {v!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"EncoderConfig: decay must be one of {DECAYS}, got {self.decay!r}")

    @property
    def ff_width(self) -> int:
        return self.d_ff or -(-(8 * self.d_model // 3) // 8) * 8


class EncoderBlock(nnx.Module):
    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        self.mixer = LION(c.d_model, c.num_heads, decay=c.decay, chunk_size=c.chunk_size,
                          impl=c.impl, num_layers=c.num_layers, std=c.init_std, rngs=rngs)
        self.norm2 = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        self.ffn = MLP(c.d_model, c.ff_width, num_layers=c.num_layers, std=c.init_std, rngs=rngs)

    def __call__(self, h, segment_ids):
        h = h + self.mixer(self.norm1(h), segment_ids=segment_ids)
        return h + self.ffn(self.norm2(h))[0]


class Encoder(nnx.Module):
    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.embed = param(rngs, nnx.initializers.normal(c.init_std),
                           (c.vocab_size, c.d_model), ("vocab", "embed"), jnp.float32)
        self.blocks = nnx.List([EncoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        self.head = dense(c.d_model, c.num_classes, ("embed", None), rngs=rngs, dtype=None,
                          param_dtype=jnp.float32, std=c.init_std, use_bias=True)

    def __call__(self, tokens, *, mask=None):
        """tokens [B, T] int -> class logits [B, num_classes] float32."""
        h = jnp.take(self.embed[...], tokens, axis=0)
        seg = None if mask is None else jnp.asarray(mask).astype(jnp.int32)
        for block in self.blocks:
            h = block(h, seg)
        h = self.norm(h)
        w = jnp.ones(tokens.shape, jnp.float32) if mask is None else seg.astype(jnp.float32)
        pooled = jnp.einsum("btd,bt->bd", h, w) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
        return self.head(pooled).astype(jnp.float32)
