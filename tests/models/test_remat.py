"""`LMConfig.remat="block"`: the backward recomputes each block from its input, so what training
keeps grows by one [B, T, d_model] activation per layer (and the layer's parameters, which the
scan hands the backward), with the gradients of `remat="none"`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax.models import LM, LMConfig
from tests.utils import assert_close

B, T, D = 2, 128, 64


def _model(num_layers, remat, dtype="bfloat16"):
    cfg = LMConfig(vocab_size=32, d_model=D, num_layers=num_layers, num_heads=2,
                   mixer="gated_deltanet", remat=remat, dtype=dtype)
    return LM(cfg, rngs=nnx.Rngs(0))


def _loss(graphdef, rest, tokens, seg):
    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(tokens, segment_ids=seg)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return loss


def _saved_bytes(model, tokens, seg) -> tuple[int, int]:
    """(bytes of the residuals of the loss's backward, bytes of the parameters)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves = jax.eval_shape(lambda p, t, s: jax.tree.leaves(
        jax.vjp(_loss(graphdef, rest, t, s), p)[1]), params, tokens, seg)
    size = lambda xs: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(xs))
    return size(leaves), size(params)


def test_block_remat_keeps_one_activation_per_layer():
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    (s1, p1), (s2, p2) = (_saved_bytes(_model(n, "block"), tokens, seg) for n in (1, 2))
    h = B * T * D * jnp.dtype(jnp.bfloat16).itemsize
    assert s2 - s1 <= h + (p2 - p1)
    none1, _ = _saved_bytes(_model(1, "none"), tokens, seg)
    none2, _ = _saved_bytes(_model(2, "none"), tokens, seg)
    assert s2 - s1 < (none2 - none1) / 4


def test_block_remat_gradients_equal():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 32, (B, T)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * (T // 2) + [2] * (T - T // 2)], B, 0), jnp.int32)
    grads = []
    for remat in ("none", "block"):
        graphdef, params, rest = nnx.split(_model(2, remat, dtype="float32"), nnx.Param, ...)
        grads.append(jax.jit(jax.value_and_grad(_loss(graphdef, rest, tokens, seg)))(params))
    assert_close(grads[1][0], grads[0][0], 1e-6, "loss")
    for a, b in zip(jax.tree.leaves(grads[1][1]), jax.tree.leaves(grads[0][1]),
                    strict=True):
        assert_close(a, b, 1e-5, "grad")


def test_remat_is_checked():
    with pytest.raises(ValueError, match="remat"):
        LMConfig(vocab_size=32, remat="full")
