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
