"""The language model: config validation, generation == argmax decoding by re-running the full
forward (a hybrid stack holding every kind of layer cache and MoE layers), and training on a toy
task for one mixer of each family."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from linear_jax.hub.core import family_for
from linear_jax.kernels.configs import TpuConfig, TritonChunkConfig
from linear_jax.layers import MIXERS
from linear_jax.models import LM, LMConfig, decode_fns, generate, logit_fns
from linear_jax.ops import registry
from tests.utils import assert_close


def test_config_validation():
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig(vocab_size=8, mixer="nope")
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig(vocab_size=8, num_layers=2, layers=("gla", "nope"))
    with pytest.raises(ValueError, match="must divide d_model"):
        LMConfig(vocab_size=8, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="num_layers=3"):
        LMConfig(vocab_size=8, num_layers=3, layers=("gla", "gla"))
    with pytest.raises(ValueError, match="top_k"):
        LMConfig(vocab_size=8, ffn="moe", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="ffn_layers"):
        LMConfig(vocab_size=8, num_layers=2, ffn="moe", ffn_layers=("mlp", "dense"))
    c = LMConfig(vocab_size=8, num_layers=2, ffn="moe", ffn_layers=["mlp", "moe"], moe_d_ff=8,
                 moe_options={"scoring": "sigmoid"})
    assert [c.layer_ffn(i) for i in range(2)] == ["mlp", "moe"] and c.moe_width == 8 and hash(c)
    c = LMConfig(vocab_size=8, num_layers=8, mixer="gla", attn_every=4,
                 mixer_options={"attention": {"window": 16}})
    assert c.layer_mixers() == ("gla",) * 3 + ("attention",) + ("gla",) * 3 + ("attention",)
    assert c.options("attention") == {"window": 16} and hash(c)
    tri = TritonChunkConfig(block_v=32)
    c = LMConfig(vocab_size=8, kernel_config=[tri, TpuConfig()])
    assert c.kernel_config == (tri, TpuConfig()) and hash(c)
    assert LMConfig(vocab_size=8, kernel_config=tri).kernel_config == (tri,)
    with pytest.raises(ValueError, match="kernel_config must hold kernel configs"):
        LMConfig(vocab_size=8, kernel_config=({"block_v": 32},))
    with pytest.raises(ValueError, match="kernel_config must be a tuple"):
        LMConfig(vocab_size=8, kernel_config="triton")
    with pytest.raises(ValueError, match="kernel_config holds more than one TritonChunkConfig"):
        LMConfig(vocab_size=8, kernel_config=(tri, TritonChunkConfig()))


def test_norm_none_is_a_residual_stack_without_norms_and_decodes_as_it_forwards():
    with pytest.raises(ValueError, match="norm must be 'rms' or 'none'"):
        LMConfig(vocab_size=8, norm="layer")
    with pytest.raises(ValueError, match="norm must be 'rms' or 'none'"):
        LMConfig(vocab_size=8, norm="none", residual="normed")
    c = LMConfig(vocab_size=11, d_model=16, num_layers=3, num_heads=2, mixer="linear_attention",
                 ffn="none", norm="none", tie_embeddings=False)
    model = LM(c, rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("norm" in n for n in names)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 11)

    @jax.jit               # op-by-op dispatch of the layers' chunk forms costs more than this
    def forward_and_by_hand(model, ids):
        h = model.embed[...][ids]
        for i in range(c.num_layers):                # h <- h + mixer(h), with no norm anywhere
            h = h + model.layer(i).mixer(h)[0]
        return model(ids)[0], h @ model.head[...]
    assert_close(*forward_and_by_hand(model, ids), 1e-5)
    with pytest.raises(ValueError, match="norm='none'"):     # no checkpoint format has no norms
        family_for(c)
    # with MLPs too, and token by token through the caches
    c = dataclasses.replace(c, ffn="mlp", mixer="gla")
    model = LM(c, rngs=nnx.Rngs(0))
    params, prefill, step = logit_fns(model)
    logits, cache = prefill(params, ids[:, :4], model.init_cache(2, 9))
    outs = [logits]
    for t in range(4, 9):
        logits, cache = step(params, ids[:, t], cache)
        outs.append(logits[:, None])
    assert_close(jnp.concatenate(outs, axis=1), jax.jit(lambda m, t: m(t)[0])(model, ids), 1e-4)


@pytest.mark.parametrize("impl", ["chunk", "recurrent", "pallas"])
def test_impl_reaches_the_linear_mixers_and_leaves_attention_valid(impl):
    """A hybrid's `impl` is the linear mixers' op impl; attention keeps its own backend, which its
    options set (they win over the model-wide arguments): no ValueError, no TypeError."""
    cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mixer="gla",
                   attn_every=2, impl=impl, chunk_size=8,
                   mixer_options={"attention": {"impl": "xla"}, "gla": {"chunk_size": 4}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    gla, attn = model.layer_mixer(0), model.layer_mixer(1)
    assert dict(gla.op_kw)["impl"] == impl and dict(gla.op_kw)["chunk_size"] == 4
    assert attn.implementation == "xla"
    tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 16)
    ref = LM(dataclasses.replace(cfg, impl="chunk", mixer_options=()), rngs=nnx.Rngs(0))
    assert_close(jax.jit(lambda m, t: m(t)[0])(model, tokens),
                 jax.jit(lambda m, t: m(t)[0])(ref, tokens), 1e-5, "logits")
    # without options attention runs its default backend whatever the model's impl
    plain = LM(LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mixer="gla",
                        attn_every=2, impl=impl), rngs=nnx.Rngs(0))
    assert plain.layer_mixer(1).implementation is None


def test_kernel_config_reaches_the_kernel(monkeypatch):
    """`LMConfig.kernel_config` flows model -> mixer -> op -> kernel: a GLA model on the Triton
    kernel (interpret mode on a CPU) equals the chunk form, and the kernel ran with the config of
    its type from the model's tuple."""
    resolve, seen = registry.resolve, []

    def spy(op, impl, T, config=None, args=()):
        choice = resolve(op, impl, T, config, args)
        seen.append((op, choice.impl, choice.config))
        return choice

    monkeypatch.setattr(registry, "resolve", spy)
    tri = TritonChunkConfig(block_v=16, block_k=16, block_k_bwd=16)
    base = dict(vocab_size=16, d_model=16, num_layers=1, num_heads=2, mixer="gla",
                chunk_size=16, init_std=0.1)
    tokens = jax.random.randint(jax.random.key(0), (1, 20), 0, 16)
    # jitted: op by op, the interpreted kernel and the chunk form dispatch slowly
    run = lambda **kw: jax.jit(lambda m: m(tokens)[0])(LM(LMConfig(**base, **kw),
                                                          rngs=nnx.Rngs(0)))
    logits = run(impl="pallas:triton", kernel_config=(TpuConfig(chunk=8), tri))
    assert seen == [("gla", "pallas:triton", tri)]
    assert_close(logits, run(impl="chunk"), 1e-5, "logits")


def test_generate_equals_argmax_of_full_forward():
    """Greedy decoding through a hybrid stack holding one layer of each kind of cache (MoE on every
    other layer): a sliding-window KV cache, MLA's latent KV cache sized by `generate`, a recurrent
    state behind a short convolution, an SSM state, token shift, slots. The LM hands each layer
    its own cache (`LM.init_cache`, `LM.__call__`), so this checks the model's plumbing; that every
    mixer decodes as its full forward is tests/layers/test_mixers.py's (every mixer in one stack
    took over a minute here, compiling each mixer three more times)."""
    names = ("attention", "mla", "gated_deltanet", "mamba2", "rwkv7", "gsa")
    assert set(names) <= set(MIXERS)
    cfg = LMConfig(vocab_size=64, d_model=32, num_layers=len(names), num_heads=2, layers=names,
                   ffn="moe", num_experts=4, top_k=2, moe_every=2, chunk_size=8, init_std=0.1,
                   mixer_options={"attention": {"window": 4}, "gsa": {"num_slots": 4}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (2, 7), 0, 64)
    n_new = 6
    out = np.asarray(generate(model, prompt, n_new))
    assert out.shape == (2, 7 + n_new) and (out[:, :7] == np.asarray(prompt)).all()
    # greedy decoding by re-running the full forward; one padded length, causality makes the
    # positions after t irrelevant to the logits at t
    full = jax.jit(lambda m, t: m(t)[0])
    seq = np.concatenate([np.asarray(prompt), np.zeros((2, n_new), np.int32)], 1)
    for t in range(7, 7 + n_new):
        seq[:, t] = np.asarray(jnp.argmax(full(model, jnp.asarray(seq))[:, t - 1], -1))
    np.testing.assert_array_equal(out, seq)


def test_generate_samples_with_temperature_and_top_k():
    cfg = LMConfig(vocab_size=32, d_model=32, num_layers=1, num_heads=2, mixer="gla",
                   chunk_size=8)
    model = LM(cfg, rngs=nnx.Rngs(0))
    prompt = jnp.zeros((3, 4), jnp.int32)
    a = generate(model, prompt, 5, temperature=1.0, top_k=4, rng=jax.random.key(3))
    b = generate(model, prompt, 5, temperature=1.0, top_k=4, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 9) and int(a.max()) < 32
    # one compilation of the step served every token of both calls
    _, prefill, step = decode_fns(model, temperature=1.0, top_k=4)
    assert step._cache_size() == 1 and prefill._cache_size() == 1


def _counting_batch(rng, B, T, V):
    """token_{t+1} = token_t + s (mod V) with a step s in {1, 2, 3} drawn per sequence: the next
    token needs the previous two, so a model without token mixing stays at loss >= log 3."""
    start = rng.integers(0, V, (B, 1))
    step = rng.integers(1, 4, (B, 1))
    return jnp.asarray((start + step * np.arange(T)) % V, jnp.int32)


@pytest.mark.parametrize("mixer,ffn", [("linear_attention", "mlp"), ("gla", "mlp"),
                                       ("gated_deltanet", "mlp"), ("mamba2", "moe")])
def test_lm_learns_a_toy_task(mixer, ffn):
    cfg = LMConfig(vocab_size=16, d_model=32, num_layers=2, num_heads=2, mixer=mixer, ffn=ffn,
                   num_experts=4, top_k=2, chunk_size=8)
    model = LM(cfg, rngs=nnx.Rngs(0))
    gdef, params = nnx.split(model)
    opt = optax.adam(1e-2)

    def loss_fn(params, tokens):
        logits, _, aux = nnx.merge(gdef, params)(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return ce[:, 2:].mean() + 0.01 * aux

    @jax.jit
    def train_step(params, opt_state, tokens):
        loss, g = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    opt_state, losses = opt.init(params), []
    for _ in range(60):
        params, opt_state, loss = train_step(params, opt_state, _counting_batch(rng, 16, 17, 16))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.log(3), f"{mixer}: {losses[0]:.3f} -> {losses[-5:]}"


def test_bfloat16_compute_tracks_float32():
    """The same float32 parameters computing in bfloat16: finite logits close to float32's, and
    generation runs with a bfloat16 cache."""
    layers = ("gated_deltanet", "attention", "mamba2")
    make = lambda dtype: LM(LMConfig(vocab_size=32, d_model=32, num_layers=3, num_heads=2,
                                     layers=layers, chunk_size=8, dtype=dtype),
                            rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 32)
    ref, _, _ = jax.jit(lambda m, t: m(t))(make(None), tokens)
    model = make("bfloat16")
    out, _, _ = jax.jit(lambda m, t: m(t))(model, tokens)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    err = np.linalg.norm(np.asarray(out - ref)) / np.linalg.norm(np.asarray(ref))
    assert err < 3e-2, err
    gen = generate(model, tokens[:, :5], 3, cache_dtype=jnp.bfloat16)
    assert gen.shape == (2, 8)
