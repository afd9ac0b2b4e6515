"""The softmax-attention layer against an independent reference: RoPE written as a complex rotation
of the pairs (x_i, x_{i + d/2}), causal softmax by einsum, the layer's own projections."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linear_jax.layers import make_mixer


def test_attention_equals_einsum_softmax_with_rope():
    B, T, D, H = 2, 16, 64, 2
    layer = make_mixer("attention", D, H, rngs=nnx.Rngs(0), std=0.2)
    x = jax.random.normal(jax.random.key(1), (B, T, D))

    @jax.jit                                 # eagerly, each small op would compile alone
    def layer_and_reference(layer, x):
        proj = lambda m: (x @ m.kernel[...]).reshape(B, T, H, -1)
        q, k, v = proj(layer.q_proj), proj(layer.k_proj), proj(layer.v_proj)
        d = q.shape[-1] // 2
        turn = jnp.exp(1j * jnp.arange(T)[:, None, None] * 10000.0 ** (-jnp.arange(d) / d))

        def rot(a):
            z = (a[..., :d] + 1j * a[..., d:]) * turn
            return jnp.concatenate([z.real, z.imag], -1)

        s = jnp.einsum("bthd,bshd->bhts", rot(q), rot(k)) / np.sqrt(2 * d)
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(B, T, -1)
        return layer(x)[0], o @ layer.o_proj.kernel[...]
    y, ref = layer_and_reference(layer, x)
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)
