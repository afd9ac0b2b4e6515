"""Decoding: logits step by step, sampling, and scoring a continuation.

The prefill runs the chunk-parallel forms over the whole prompt and leaves every layer's cache
(recurrent state, short-conv window, KV cache for attention layers); each decode step feeds one
token through `LM.__call__` with the cache, which for a linear mixer costs O(1) in the context
length. Every function here is jitted once per (model structure, shapes) and reused, on the
model's `unstacked()` form (one layer per stack, so a step never slices parameters out of the
stacked layers); an eager `LM` call instead traces every op anew (about a second even for a toy
model). The jitted pattern:

    params, prefill, step = logit_fns(model)
    cache = model.init_cache(B)                         # max_len= only with attention layers
    logits, cache = prefill(params, prompt, cache)      # [B, P, V]
    logits, cache = step(params, token, cache)          # token [B] -> [B, V]

- `logit_fns(model)`: (params, prefill, step) returning float32 logits and the cache;
- `decode_fns(model, temperature, top_k)`: the same returning sampled tokens;
- `generate(model, prompt, max_new_tokens, ...)`: prompt -> prompt + sampled continuation;
- `score(model, prompt, continuation)`: log p(continuation_i | prompt, continuation_<i), one
  forward over both (no cache).

A KV cache holds `max_len` positions: a call that would write past it raises when that is known
at trace time (the call alone is too long) and gives NaN logits under `jit`, where the write
position is traced (`LM.__call__`). `generate` sizes the cache for prompt + new tokens.
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
def _logit_fns(graphdef):
    def prefill(params, tokens, cache):
        logits, cache, _ = nnx.merge(graphdef, params)(tokens, cache=cache)
        return logits, cache

    def step(params, token, cache):
        logits, cache, _ = nnx.merge(graphdef, params)(token[:, None], cache=cache)
        return logits[:, 0], cache

    return jax.jit(prefill, donate_argnums=2), jax.jit(step, donate_argnums=2)


def logit_fns(model):
    """(params, prefill, step), jitted: `prefill(params, tokens [B, P], cache) -> (logits
    [B, P, V] float32, cache)` and `step(params, token [B], cache) -> (logits [B, V], cache)`.
    Both donate the cache (every mixer's `init_cache` holds distinct buffers, so it can be
    donated whole): use the one they return. `params` are those of `model.unstacked()`."""
    graphdef, params = nnx.split(model.unstacked())
    return (params, *_logit_fns(graphdef))


@functools.lru_cache(maxsize=32)
def _decode_fns(graphdef, temperature: float, top_k: int | None):
    def prefill(params, tokens, cache, rng):
        logits, cache, _ = nnx.merge(graphdef, params)(tokens, cache=cache)
        return sample(logits[:, -1], rng, temperature, top_k), cache

    def step(params, token, cache, rng):
        logits, cache, _ = nnx.merge(graphdef, params)(token[:, None], cache=cache)
        return sample(logits[:, -1], rng, temperature, top_k), cache

    return jax.jit(prefill, donate_argnums=2), jax.jit(step, donate_argnums=2)


def decode_fns(model, temperature: float = 0.0, top_k: int | None = None):
    """(params, prefill, step): `prefill(params, prompt, cache, rng) -> (token, cache)` and
    `step(params, token, cache, rng) -> (token, cache)`, jitted, sampling (`sample`) from the
    last position's logits; both donate the cache."""
    graphdef, params = nnx.split(model.unstacked())
    return (params, *_decode_fns(graphdef, float(temperature), top_k))


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


@functools.lru_cache(maxsize=32)
def _score_fn(graphdef):
    def score(params, prompt, continuation):
        P, N = prompt.shape[1], continuation.shape[1]
        tokens = jnp.concatenate([prompt, continuation[:, :-1]], 1)
        logits = nnx.merge(graphdef, params)(tokens)[0][:, P - 1:P - 1 + N]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return jnp.take_along_axis(logp, continuation[..., None], -1)[..., 0]

    return jax.jit(score)


def score(model, prompt, continuation):
    """prompt int [B, P] (P >= 1), continuation int [B, N] -> float32 [B, N]: the log-probability
    of each continuation token given the prompt and the continuation before it; `.sum(-1)` is the
    continuation's log-likelihood. One jitted forward over prompt + continuation (without its
    last token), no cache."""
    prompt = jnp.asarray(prompt, jnp.int32)
    continuation = jnp.asarray(continuation, jnp.int32)
    if prompt.ndim != 2 or continuation.ndim != 2 or prompt.shape[0] != continuation.shape[0]:
        raise ValueError(f"score: prompt [B, P] and continuation [B, N] with the same B, got "
                         f"{tuple(prompt.shape)} and {tuple(continuation.shape)}")
    if prompt.shape[1] < 1 or continuation.shape[1] < 1:
        raise ValueError(f"score: the prompt and the continuation need a token each at least "
                         f"(the first continuation token is predicted from the prompt), got "
                         f"{tuple(prompt.shape)} and {tuple(continuation.shape)}")
    graphdef, params = nnx.split(model)
    return _score_fn(graphdef)(params, prompt, continuation)
