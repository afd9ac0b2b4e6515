"""The dtype the normalised linear-attention layers hand their op: the model's (bfloat16 reaches
the kernels' matrix units), except ReBased's, whose signed features' products cancel and whose op
therefore runs in float32 (`LinearAttention.float32_op`); the output is the model's dtype either
way."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from linear_jax.layers import linear_attention as layer_module
from linear_jax.layers import make_mixer


@pytest.mark.parametrize("mixer,op_dtype", [("based", jnp.bfloat16),
                                            ("linear_attention", jnp.bfloat16),
                                            ("hedgehog", jnp.bfloat16),
                                            ("rebased", jnp.float32)])
def test_op_dtype(monkeypatch, mixer, op_dtype):
    seen = []
    recurrence = layer_module.recurrence

    def spy(op, q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return recurrence(op, q, k, v, **kw)
    monkeypatch.setattr(layer_module, "recurrence", spy)
    layer = make_mixer(mixer, 16, 2, rngs=nnx.Rngs(0), chunk_size=8, dtype=jnp.bfloat16)
    y = layer(jnp.ones((1, 6, 16), jnp.bfloat16))
    y = y[0] if isinstance(y, tuple) else y
    assert seen == [(jnp.dtype(op_dtype),) * 3]
    assert y.dtype == jnp.bfloat16
