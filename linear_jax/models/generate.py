"""Autoregressive generation: one chunked prefill of the prompt, then one jitted step per token.

The prefill runs the chunk-parallel forms over the whole prompt and leaves every layer's cache
(recurrent state, short-conv window, KV cache for attention layers); each decode step feeds one
token through `LM.__call__` with the cache, which for a linear mixer costs O(1) in the context
length. Both functions are compiled once per (model structure, shapes) and reused: the step never
recompiles per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample(logits, rng, temperature: float = 0.0, top_k: int | None = None):
    """logits [B, V] -> tokens [B] int32: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest when given."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, temperature: float, top_k: int | None):
    def prefill(params, tokens, cache, rng):
        logits, cache, _ = nnx.merge(graphdef, params)(tokens, cache=cache)
        return sample(logits[:, -1], rng, temperature, top_k), cache

    def step(params, token, cache, rng):
        logits, cache, _ = nnx.merge(graphdef, params)(token[:, None], cache=cache)
        return sample(logits[:, -1], rng, temperature, top_k), cache

    return jax.jit(prefill, donate_argnums=2), jax.jit(step, donate_argnums=2)


def decode_fns(model, temperature: float = 0.0, top_k: int | None = None):
    """(params, prefill, step): `prefill(params, prompt, cache, rng) -> (token, cache)` and
    `step(params, token, cache, rng) -> (token, cache)`, jitted; both donate the cache (every
    mixer's `init_cache` holds distinct buffers, so it can be donated whole)."""
    graphdef, params = nnx.split(model)
    return (params, *_compiled(graphdef, float(temperature), top_k))


def generate(model, prompt, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, rng=None, cache_dtype=jnp.float32):
    """prompt int [B, P] -> tokens int32 [B, P + max_new_tokens] (the prompt, then the draws)."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if max_new_tokens < 1:
        return prompt
    B, P = prompt.shape
    rng = jax.random.key(0) if rng is None else rng
    params, prefill, step = decode_fns(model, temperature, top_k)
    cache = model.init_cache(B, P + max_new_tokens, cache_dtype)
    rng, sub = jax.random.split(rng)
    token, cache = prefill(params, prompt, cache, sub)
    out = [token]
    for _ in range(max_new_tokens - 1):
        rng, sub = jax.random.split(rng)
        token, cache = step(params, token, cache, sub)
        out.append(token)
    return jnp.concatenate([prompt, jnp.stack(out, 1)], 1)
