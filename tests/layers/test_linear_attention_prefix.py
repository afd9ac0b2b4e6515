"""LinearAttention(prefix=P): the first P positions attend to each other both ways, the rest
causally, against the attention written out with its mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax.layers.common import heads
from linear_jax.layers.linear_attention import LinearAttention


def _layer(prefix, **kw):
    return LinearAttention(16, 2, feature_map="identity", normalize=False, output_norm=False,
                           prefix=prefix, rngs=nnx.Rngs(0), **kw)


def _masked(layer, x, P):
    """o_t = K^-1/2 sum_s mask[t, s] (q_t . k_s) v_s, mask: s < P for t < P, else s <= t."""
    q, k, v = (heads(p(x), 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    T = x.shape[1]
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = np.where(t < P, s < P, s <= t)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * q.shape[-1] ** -0.5 * mask
    return layer.output(jnp.einsum("bhts,bshv->bthv", scores, v), x)


@pytest.mark.parametrize("P, T", [(5, 9), (9, 9), (0, 7)])
def test_prefix_attends_both_ways_then_causally(P, T):
    layer = _layer(P)
    x = jax.random.normal(jax.random.key(1), (2, T, 16))
    got, _ = layer(x)
    np.testing.assert_allclose(got, _masked(layer, x, P), rtol=1e-5, atol=1e-5)
    # a prefix token sees what comes after it (within the prefix); with P = 0 none does
    if P:
        moved = x.at[:, P - 1].add(1.0)
        assert not np.allclose(layer(moved)[0][:, 0], got[:, 0])
    g = jax.grad(lambda x: jnp.sum(layer(x)[0] ** 2))(x)
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_prefix_refuses_what_it_cannot_compute():
    layer = _layer(4)
    x = jnp.ones((1, 6, 16))
    for kw in ({"cache": layer.init_cache(1)}, {"segment_ids": jnp.zeros((1, 6), jnp.int32)}):
        with pytest.raises(ValueError, match="prefix=4"):
            layer(x, **kw)
    with pytest.raises(ValueError, match="at least 4 tokens"):
        layer(jnp.ones((1, 3, 16)))
    with pytest.raises(ValueError, match="normalize=False"):
        LinearAttention(16, 2, prefix=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prefix=-1"):
        _layer(-1)
    with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
        _layer(4, num_kv_heads=1)
    assert _layer(4, num_kv_heads=None).prefix == 4      # None is one key head per head
