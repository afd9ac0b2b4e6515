"""The LION encoder with a classification head (tiny sizes): shapes, padding masked out, each
LION kind bidirectional (gradients of the op: tests/ops/test_lion.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax.layers.lion import LION
from linear_jax.models.encoder import Encoder, EncoderConfig
from tests.utils import assert_close

CFG = EncoderConfig(vocab_size=11, num_classes=3, d_model=16, num_layers=1, num_heads=2,
                    chunk_size=8)


@pytest.mark.parametrize("decay", ["lit", "d", "s"])
def test_lion_layer_is_bidirectional(decay):
    layer = LION(16, 2, decay=decay, chunk_size=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 13, 16))
    f = nnx.jit(lambda m, x: m(x))
    y, y2 = f(layer, x), f(layer, x.at[:, -1].add(1.0))
    assert np.abs(np.asarray(y2 - y)[:, 0]).max() > 1e-6, "the first token sees the last"


def test_logits_and_padding_masked_out():
    model = Encoder(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 11, (4, 9)), jnp.int32)
    padded = jnp.concatenate([tokens, jnp.zeros((4, 4), jnp.int32)], 1)
    mask = jnp.arange(13) < 9
    f = nnx.jit(lambda m, t, mk: m(t, mask=mk))
    logits = f(model, tokens, jnp.ones((4, 9), bool))
    assert logits.shape == (4, 3) and logits.dtype == jnp.float32
    assert_close(f(model, padded, jnp.broadcast_to(mask, (4, 13))), logits, 1e-5, "padding")
