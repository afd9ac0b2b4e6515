"""A hybrid of Gated DeltaNet and sliding-window attention with learnable token eviction
(`lte_attention`): decoding equals the forward pass and the cache does not grow with T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linear_jax.models import LM, LMConfig
from tests.utils import assert_close

CFG = LMConfig(vocab_size=17, d_model=32, num_layers=2, num_heads=2, chunk_size=8,
               layers=("gated_deltanet", "lte_attention"),
               mixer_options={"lte_attention": {"window": 4, "num_retained": 2}})


def test_decode_equals_forward_and_cache_is_constant():
    model = LM(CFG, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 17, (2, 21)), jnp.int32)
    run = nnx.jit(lambda m, t, c: m(t, cache=c)[:2])
    full, _ = run(model, tokens, model.init_cache(2, max_len=21))
    logits, cache = run(model, tokens[:, :9], model.init_cache(2, max_len=21))
    outs = [logits]
    for t in range(9, 21):
        logits, cache = run(model, tokens[:, t:t + 1], cache)
        outs.append(logits)
    assert_close(jnp.concatenate(outs, 1), full, 1e-4, "prefill + decode vs forward")
    # the sparse layer's cache: the same shapes whatever the context length or max_len
    shapes = lambda c: [x.shape for x in jax.tree.leaves(c[1])]
    assert shapes(cache) == shapes(model.init_cache(2, max_len=10_000))


def test_retained_slots_are_the_top_scores_of_the_evicted():
    """Window 3, 2 retained slots: after 10 tokens the slots hold, per head, the two highest
    scores among the tokens that have left the window of the next query (positions 0 .. 7)."""
    from linear_jax.layers.common import heads, merge_heads
    from linear_jax.layers.lte_attention import LTEAttention

    layer = LTEAttention(16, 2, window=3, num_retained=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 10, 16))
    _, cache = nnx.jit(lambda m, x: m(x, cache=m.init_cache(1)))(layer, x)
    ks, _ = layer.score_conv(merge_heads(heads(layer.k_proj(x), 2)))
    s = np.einsum("bthd,hd->bth", heads(ks, 2), layer.score_w[...]) + layer.score_b[...]
    for h in range(2):
        top = np.sort(np.asarray(s[0, :8, h]))[-2:]
        assert bool(cache["rvalid"][0, h].all())
        np.testing.assert_allclose(np.sort(np.asarray(cache["rs"][0, h])), top, rtol=1e-5)
        assert set(np.asarray(cache["rpos"][0, h]).tolist()) == set(
            np.argsort(np.asarray(s[0, :8, h]))[-2:].tolist())
