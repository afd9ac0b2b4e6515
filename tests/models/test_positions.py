"""Learned absolute positions (`LMConfig.max_positions`, Zoology's attention baseline): each
token's embedding gets its in-document position's row; decoding continues from the attention
layer's cache and equals the forward; packed documents count from their own starts; past the
table it raises or gives NaN; a model without attention cannot decode with them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax.hub import core as hub_core
from linear_jax.models import LM, LMConfig
from linear_jax.models.flops import active_params
from tests.utils import assert_close

V = 32


def model(layers=("attention", "attention"), L=24, **kw):
    cfg = LMConfig(vocab_size=V, d_model=16, num_layers=len(layers), num_heads=2, layers=layers,
                   max_positions=L, chunk_size=8, init_std=0.1, param_dtype="float32",
                   mixer_options={"attention": {"rope_theta": None}}, **kw)
    return LM(cfg, rngs=nnx.Rngs(0))


def test_positions_change_the_output_and_count_from_each_document():
    m = model()
    t = jax.random.randint(jax.random.key(1), (2, 12), 0, V)
    out = m(t)[0]
    # without RoPE, attention alone is blind to order within a prefix; positions are not
    m.pos_embed[...] = jnp.zeros_like(m.pos_embed[...])
    assert float(jnp.abs(out - m(t)[0]).max()) > 1e-3
    m = model()
    seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 12])
    packed = m(t, segment_ids=seg)[0]
    second = m(t[:1, 5:])[0]                  # the second document alone, from position 0
    assert_close(packed[:1, 5:], second, 1e-5)


@pytest.mark.parametrize("layers", [("attention", "attention"), ("gla", "attention")])
def test_decoding_equals_the_forward(layers):
    m = model(layers)
    t = jax.random.randint(jax.random.key(2), (2, 11), 0, V)
    full = m(t)[0]
    cache = m.init_cache(2, 11)
    logits, cache, _ = m(t[:, :6], cache=cache)
    steps = [logits]
    for i in range(6, 11):
        logits, cache, _ = m(t[:, i:i + 1], cache=cache)
        steps.append(logits)
    assert_close(jnp.concatenate(steps, 1), full, 1e-5)


def test_past_the_table_raises_or_gives_nan_and_no_attention_cannot_decode():
    m = model(L=8)
    t = jnp.zeros((1, 9), jnp.int32)
    with pytest.raises(ValueError, match="max_positions=8"):
        m(t)
    cache = m.init_cache(1, 9)
    _, cache, _ = m(t[:, :8], cache=cache)
    with pytest.raises(ValueError, match="from position 8"):
        m(t[:, 8:], cache=cache)

    @jax.jit
    def step(m, tokens, cache):
        return m(tokens, cache=cache)[0]
    assert np.isnan(np.asarray(step(m, t[:, 8:], cache))).all()
    r = model(("gla", "gla"))
    with pytest.raises(ValueError, match="softmax-attention layer"):
        r(t[:, :2], cache=r.init_cache(1))


def test_config_params_and_hub():
    with pytest.raises(ValueError, match="max_positions"):
        LMConfig(vocab_size=V, max_positions=-1)
    m, plain = model(), model(L=0)
    count = lambda x: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(x, nnx.Param)))
    assert count(m) - count(plain) == 24 * 16
    assert active_params(m) == active_params(plain)
    with pytest.raises(ValueError, match="learned absolute positions"):
        hub_core.family_for(m.config)
