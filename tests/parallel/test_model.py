"""A whole hybrid language model split along T: the train step with `seq_parallel` on a mesh with a
`seq` axis computes the loss and the gradients of the unsharded step, packed documents included
(resets inside shards and exactly on shard boundaries). Meshes are subsets of the 8 simulated host
devices (conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from linear_jax.layers import MIXERS, supports_seq_parallel
from linear_jax.models import LM, LMConfig
from linear_jax.parallel import SeqParallel
from linear_jax.training import mesh_from_config as make_mesh
from linear_jax.training import sharding, step
from tests.parallel.common import packed_segments
from tests.utils import assert_close

pytestmark = pytest.mark.timeout(600)
VOCAB, B, T = 32, 4, 64
TOL = 2e-5  # fp32; the parallel ops re-associate sums (measured <= 5e-6)


def keep_gradients():
    """An optax transformation that leaves the parameters as they are and keeps the last
    gradient as its state: the new state's `opt_state` is the step's gradient, exactly."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def batch_of(seed, segments):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "mask": (rng.uniform(size=(B, T)) < 0.9).astype(np.float32)}
    if segments:
        batch["segment_ids"] = np.asarray(packed_segments(B, T))
    return batch


def compare_train_step(cfg: LMConfig, mesh, sp: SeqParallel, *, segments=True, microbatches=1):
    tx = keep_gradients()
    graphdef, state = step.init_fn(lambda: LM(cfg, rngs=nnx.Rngs(0)), tx)()
    batch = batch_of(1, segments)
    kw = dict(microbatches=microbatches, aux_weight=0.01)
    new1, m1 = jax.jit(step.make_train_step(graphdef, tx, **kw))(state, batch)
    sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    assert sharded["tokens"].sharding.spec[1] == "seq"
    new2, m2 = jax.jit(step.make_train_step(graphdef, tx, seq_parallel=sp, **kw))(state, sharded)
    for name in ("loss", "accuracy", "aux_loss", "grad_norm"):
        assert_close(m2[name], m1[name], TOL, name)
    g1, g2 = new1["opt_state"], new2["opt_state"]
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g1),
                            strict=True):
        assert_close(a, b, TOL, f"gradient {jax.tree_util.keystr(path)}")
    assert float(m1["grad_norm"]) > 0


def test_hybrid_train_step_on_data_seq_mesh_equals_unsharded():
    """Gated DeltaNet (delta rule, short-conv halo), sliding-window softmax attention
    (all-gathered K, V; the window crosses the shard boundary), GLA with a short conv, MoE on one
    layer (its aux loss over the whole batch); (data=2, seq=2), two accumulated microbatches,
    packed documents."""
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=2,
                   layers=("gated_deltanet", "attention", "gla"), ffn="moe", num_experts=4,
                   moe_every=2, chunk_size=8, init_std=0.1,
                   mixer_options={"gla": {"conv_size": 4}, "attention": {"window": 24}})
    mesh = make_mesh({"data": 2, "seq": 2}, jax.devices()[:4])
    compare_train_step(cfg, mesh, SeqParallel(mesh), microbatches=2)


def test_unsupported_mixers_raise():
    assert supports_seq_parallel("gated_deltanet") and supports_seq_parallel("attention")
    assert not supports_seq_parallel("mamba") and not supports_seq_parallel("mlstm")
    assert {n for n in MIXERS if not supports_seq_parallel(n)} == {
        "mamba", "mlstm", "delta_product", "lte_attention", "s4d"}
    mesh = make_mesh({"seq": 2}, jax.devices()[:2])
    sp = SeqParallel(mesh)
    model = LM(LMConfig(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2,
                        mixer="mlstm"), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(NotImplementedError, match="MLSTM has no sequence-parallel form"):
        jax.eval_shape(lambda t: model(t, seq_parallel=sp)[0], tokens)
    # a seq axis of size 1 is the unsharded call
    one = SeqParallel(make_mesh({"seq": 1}, jax.devices()[:1]))
    assert jax.eval_shape(lambda t: model(t, seq_parallel=one)[0], tokens).shape == (2, 8, VOCAB)
    with pytest.raises(ValueError, match="attention_layout"):
        SeqParallel(mesh, attention_layout="ring")
    with pytest.raises(ValueError, match="no axis 'time'"):
        SeqParallel(mesh, axis_name="time")


def test_every_other_mixer_forward_on_seq4_tensor2_equals_unsharded():
    """One layer of each other sequence-parallel `mix` (the subclasses not listed share one:
    Based / ReBased / Hedgehog that of linear attention, Lightning RetNet's, EFLA DeltaNet's),
    Mamba-2 (SSD; a conv with a bias), the RG-LRU (HGRN's op; channels split over tensor), MLA
    (heads whole) and block-local softmax attention in the zigzag layout, on seq=4 x tensor=2
    (heads split too), packed documents: the logits equal the unsharded ones."""
    names = ("linear_attention", "retnet", "hgrn2", "deltanet", "gsa", "hla", "mom", "mamba2",
             "rglru", "mla", "attention")
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, num_layers=len(names), num_heads=2,
                   layers=names, chunk_size=8, init_std=0.1,
                   mixer_options={"gsa": {"num_slots": 4}, "attention": {"block_size": 12}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh({"seq": 4, "tensor": 2}, jax.devices()[:8])
    sp = SeqParallel(mesh, attention_layout="zigzag")
    batch = batch_of(2, segments=True)
    run = lambda sp: jax.jit(lambda m, t, s: m(t, segment_ids=s, seq_parallel=sp)[0])(
        model, batch["tokens"], batch["segment_ids"])
    assert_close(run(sp), run(None), TOL, "logits")
