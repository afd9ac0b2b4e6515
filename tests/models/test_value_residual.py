"""RWKV-7's value residual through the model: the first RWKV-7 layer's value reaches the later
layers (the layer scan carries it), which mix it with their own; decoding equals the forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from linear_jax.models import LM, LMConfig, logit_fns
from tests.utils import assert_close

VOCAB = 32


def test_rwkv7_value_residual():
    ranks = {"decay_rank": 8, "a_rank": 8, "gate_rank": 8, "value_rank": 8}
    # the op's scan: it compiles faster than the chunk form, which its contract tests
    cfg = LMConfig(vocab_size=VOCAB, d_model=16, num_layers=3, num_heads=2, mixer="rwkv7",
                   impl="recurrent", init_std=0.1, mixer_options={"rwkv7": ranks})
    model = LM(cfg, rngs=nnx.Rngs(0))
    # layer 0 gives v_first, layers 1 and 2 (one scanned stack of two) mix it in
    assert [s.num_layers for s in model.stacks] == [1, 2]
    assert [model.layer_mixer(i).mixes_value for i in range(3)] == [False, True, True]
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, VOCAB)
    full = jax.jit(lambda m, t: m(t)[0])(model, tokens)

    @jax.jit
    def by_hand(m, t, first):
        """The layers one by one, layers 1, 2 given layer 0's value times `first` (1 or 0)."""
        h = jnp.take(m.embed[...], t, axis=0)
        y, _, _, v0 = m.layer(0)(h, v_first=jnp.zeros_like(h))
        v_first = v0 * first
        for i in (1, 2):
            y, _, _, _ = m.layer(i)(y, v_first=v_first)
        return m.norm(y) @ m.embed[...].T

    assert_close(by_hand(model, tokens, 1.0), full, 1e-5, "forward vs by hand")
    assert float(jnp.max(jnp.abs(by_hand(model, tokens, 0.0) - full))) > 1e-3

    params, prefill, step = logit_fns(model)
    logits, cache = prefill(params, tokens[:, :6], model.init_cache(2))
    steps = [logits]
    for t in range(6, 11):
        logits, cache = step(params, tokens[:, t], cache)
        steps.append(logits[:, None])
    assert_close(jnp.concatenate(steps, 1), full, 1e-4, "decoded logits")
