"""The decoding API: logits step by step equal the full forward, a continuation's scores are its
log-probabilities, `init_cache` needs `max_len` only for attention, and a KV cache that would
overflow raises (eagerly, or a call longer than the cache) or gives NaN logits under `jit`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax.models import LM, LMConfig, logit_fns, score
from tests.utils import assert_close

VOCAB = 32


@functools.lru_cache(maxsize=1)
def hybrid():
    """Two periods of (Gated DeltaNet, attention): stacked layers, a KV cache. One model for the
    module, so that the tests share its jitted decoding functions (`logit_fns` caches them by
    structure)."""
    cfg = LMConfig(vocab_size=VOCAB, d_model=16, num_layers=4, num_heads=2,
                   layers=("gated_deltanet", "attention") * 2, chunk_size=8, init_std=0.1)
    return LM(cfg, rngs=nnx.Rngs(0))


def test_logit_fns_equal_the_full_forward():
    model = hybrid()
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, VOCAB)
    full = jax.jit(lambda m, t: m(t)[0])(model, tokens)
    params, prefill, step = logit_fns(model)
    cache = model.init_cache(2, 13)
    logits, cache = prefill(params, tokens[:, :7], cache)
    assert logits.shape == (2, 7, VOCAB) and logits.dtype == jnp.float32
    steps, compiled = [logits], None
    for t in range(7, 13):
        logits, cache = step(params, tokens[:, t], cache)
        assert logits.shape == (2, VOCAB)
        steps.append(logits[:, None])
        compiled = compiled or step._cache_size()
    assert_close(jnp.concatenate(steps, 1), full, 1e-4, "decoded logits")
    assert step._cache_size() == compiled            # one compilation for every step


def test_score_is_the_log_probability_of_the_continuation():
    model = hybrid()
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, VOCAB)
    cont = jax.random.randint(jax.random.key(3), (2, 4), 0, VOCAB)
    logp = score(model, prompt, cont)
    assert logp.shape == (2, 4) and bool(jnp.all(logp <= 0))
    logits = jax.jit(lambda m, t: m(t)[0])(model, jnp.concatenate([prompt, cont], 1))
    ref = jax.nn.log_softmax(logits[:, 4:8], -1)
    ref = np.take_along_axis(np.asarray(ref), np.asarray(cont)[..., None], -1)[..., 0]
    assert_close(logp, ref, 1e-5, "log-probs")
    with pytest.raises(ValueError, match="need a token each"):
        score(model, prompt[:, :0], cont)


def test_init_cache_needs_max_len_only_with_attention():
    linear = LM(LMConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                         mixer="gated_deltanet"), rngs=nnx.Rngs(0))
    cache = linear.init_cache(3)
    assert len(cache) == 2 and cache[0]["state"].shape[0] == 3
    with pytest.raises(ValueError, match=r"layer\(s\) \[1, 3\] are softmax attention.*max_len"):
        hybrid().init_cache(1)
    latent = LM(LMConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                         layers=("kda", "mla")), rngs=nnx.Rngs(0))       # MLA's latent cache
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] are softmax attention.*max_len"):
        latent.init_cache(1)
    with pytest.raises(ValueError, match=r"layer 1 \(mla\): 5 new token\(s\).*max_len=4"):
        latent(jnp.zeros((1, 5), jnp.int32), cache=latent.init_cache(1, 4))


def test_running_past_the_kv_cache_raises_or_gives_nan():
    model = hybrid()
    tokens = jax.random.randint(jax.random.key(4), (1, 6), 0, VOCAB)
    params, prefill, step = logit_fns(model)
    _, cache = prefill(params, tokens, model.init_cache(1, 8))   # 6 of 8 slots written
    # an eager call sees the concrete write position: it raises before computing anything
    with pytest.raises(ValueError, match=r"3 new token\(s\) at position 6 do not fit .*max_len=8"):
        model(tokens[:, :3], cache=cache)
    with pytest.raises(ValueError, match="max_len=8"):           # T alone: static, under jit
        prefill(params, jnp.zeros((1, 9), jnp.int32), model.init_cache(1, 8))
    cache = model.init_cache(1, 8)
    logits, cache = prefill(params, tokens, cache)
    for _ in range(2):                                           # slots 7 and 8: they fit
        logits, cache = step(params, jnp.argmax(logits.reshape(1, -1, VOCAB)[:, -1], -1), cache)
        assert bool(jnp.all(jnp.isfinite(logits)))
    logits, cache = step(params, jnp.zeros((1,), jnp.int32), cache)   # a 9th: NaN, not wrong
    assert bool(jnp.all(jnp.isnan(logits)))
