"""Based and ReBased with `compact=True`: each product of the quadratic feature block kept once is
the same layer as the full map (same parameters, same outputs and gradients up to rounding), with
a smaller state, and its decode still equals its forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax.layers import make_mixer
from tests.utils import rel_err

B, D, H, T, C = 2, 32, 2, 19, 8


def _pair(mixer, d):
    full = make_mixer(mixer, D, H, rngs=nnx.Rngs(0), chunk_size=C, feature_dim=d)
    compact = make_mixer(mixer, D, H, rngs=nnx.Rngs(0), chunk_size=C, feature_dim=d,
                         compact=True)
    return full, compact


@pytest.mark.parametrize("mixer,d,widths", [("based", 16, (273, 153)),
                                            ("rebased", 16, (256, 136)),
                                            ("based", 5, (31, 21))])
def test_compact_features_are_the_same_layer_with_a_smaller_state(mixer, d, widths):
    full, compact = _pair(mixer, d)
    assert (full.feature_width(), compact.feature_width()) == widths
    shapes = [jax.tree.leaves(m.init_cache(B, jnp.float32, max_len=T))[-1].shape
              for m in (full, compact)]
    assert [s[-2] for s in shapes] == list(widths)
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    seg = jnp.asarray(np.repeat([[0] * 11 + [1] * 8], B, 0), jnp.int32)

    def loss_and_out(layer):
        gdef, params = nnx.split(layer)

        def f(p, x):
            y, _ = nnx.merge(gdef, p)(x, segment_ids=seg)
            return jnp.sum(jnp.sin(y)), y
        (_, y), (gp, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
        return y, gx, jax.tree.leaves(gp)

    (y0, gx0, gp0), (y1, gx1, gp1) = loss_and_out(full), loss_and_out(compact)
    assert rel_err(y1, y0) < 1e-5
    assert rel_err(gx1, gx0) < 1e-5
    for a, b in zip(gp1, gp0, strict=True):
        assert rel_err(a, b) < 1e-5


def test_compact_based_decodes_as_it_runs_forward():
    _, layer = _pair("based", 16)
    x = jax.random.normal(jax.random.key(2), (B, T, D))
    y, _ = layer(x, cache=layer.init_cache(B, jnp.float32, max_len=T))
    cache, steps = layer.init_cache(B, jnp.float32, max_len=T), []
    for t in range(T):
        yt, cache = layer(x[:, t:t + 1], cache=cache)
        steps.append(yt)
    assert rel_err(jnp.concatenate(steps, axis=1), y) < 1e-5
