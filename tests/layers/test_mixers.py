"""The layer invariants, run on every mixer in `linear_jax.layers.MIXERS` at tiny sizes (fp32):
full forward == step-by-step decode == prefill + decode == the sequence in two calls with the cache
carried; packed documents == separate runs (documents starting mid-call and exactly at a call
boundary); causality through gradients; finite gradients of every parameter.

Every check reuses one jitted function per mixer at three shapes (T = 24, 12, 1; segment ids and a
cache always passed) plus one gradient, so the suite compiles little; `GROUP_BY` has
tests/conftest.py run a mixer's tests together (pytest-xdist hands a worker consecutive tests), so
its layer is built and its forward compiled at each shape once, not once per worker.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linear_jax.layers import MIXERS, make_mixer
from tests.utils import assert_close

B, D, H, T, C = 2, 32, 2, 24, 8
TOL = 1e-4
# every mixer at its defaults (shrunk where a default is large), plus variants worth covering
CASES = {name: (name, {}) for name in MIXERS}
CASES.update({
    "gsa": ("gsa", {"num_slots": 4}),
    "based": ("based", {"feature_dim": 8}),
    "rebased": ("rebased", {"feature_dim": 8}),
    "attention-window-gqa": ("attention", {"window": 5, "num_kv_heads": 1}),
    "attention-diag": ("attention", {"block_size": 8}),
    "linear_attention-nonorm": ("linear_attention", {"normalize": False}),
    "deltanet-negeig-gate": ("deltanet", {"allow_neg_eigval": True, "output_gate": True}),
    "hgrn2-lowerbound": ("hgrn2", {"lower_bound": 0.5}),
    "mamba3-mimo": ("mamba3", {"mimo_rank": 2}),
    "mamba-negeig": ("mamba", {"allow_neg_eigval": True}),
    "mamba2-negeig": ("mamba2", {"allow_neg_eigval": True}),
    "s4d-ungated": ("s4d", {"gated": False, "d_state": 4}),
    "lte_attention-evicting": ("lte_attention", {"window": 5, "num_retained": 3,
                                                 "num_kv_heads": 1}),
})
NAMES = sorted(CASES)
GROUP_BY = "name"


@functools.cache
def _setup(name):
    mixer, options = CASES[name]
    layer = make_mixer(mixer, D, H, rngs=nnx.Rngs(0), chunk_size=C, **options)
    gdef, params = nnx.split(layer)
    f = jax.jit(lambda p, x, seg, cache: nnx.merge(gdef, p)(x, segment_ids=seg, cache=cache))
    run = lambda x, seg, cache: f(params, x, seg, cache)
    fresh = lambda: layer.init_cache(B, jnp.float32, max_len=T)
    return gdef, params, run, fresh


def _x(seed):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _calls(run, cache, x, seg, cuts):
    ys = []
    for a, b in zip((0,) + cuts, cuts + (x.shape[1],), strict=True):
        y, cache = run(x[:, a:b], seg[:, a:b], cache)
        ys.append(y)
    return jnp.concatenate(ys, 1), cache


@pytest.mark.parametrize("name", NAMES)
def test_full_equals_decode_and_prefill(name):
    _, _, run, fresh = _setup(name)
    x, seg = _x(1), jnp.zeros((B, T), jnp.int32)
    y, cache = run(x, seg, fresh())
    y_step, cache_step = _calls(run, fresh(), x, seg, tuple(range(1, T)))
    assert_close(y_step, y, TOL, f"{name}: step decode")
    y_pre, _ = _calls(run, fresh(), x, seg, (12,) + tuple(range(13, T)))
    assert_close(y_pre, y, TOL, f"{name}: prefill 12 + decode")
    y_two, cache_two = _calls(run, fresh(), x, seg, (12,))
    assert_close(y_two, y, TOL, f"{name}: two calls")
    for a, b, c in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_step),
                       jax.tree.leaves(cache_two), strict=True):
        assert_close(b, a, TOL, f"{name}: cache after step decode")
        assert_close(c, a, TOL, f"{name}: cache after two calls")


@pytest.mark.parametrize("name", NAMES)
def test_packed_equals_separate(name):
    _, _, run, fresh = _setup(name)
    x = _x(2)
    # row 0 packs A (12 tokens), B (5), A again (7): ids repeat, resets follow changes
    seg = jnp.asarray(np.stack([np.repeat([0, 1, 0], (12, 5, 7)), np.zeros(T)]), jnp.int32)
    y, _ = run(x, seg, fresh())
    y_cut, _ = _calls(run, fresh(), x, seg, (12,))     # B starts exactly at the second call
    assert_close(y_cut, y, TOL, f"{name}: packed, cut at a document start")
    # each document alone in a row of 12 tokens; tokens after a document's end are padding,
    # which cannot reach it (causality)
    pad = lambda d: jnp.pad(d, ((0, 12 - d.shape[0]), (0, 0)))
    z12 = jnp.zeros((B, 12), jnp.int32)
    sep1, _ = run(jnp.stack([x[0, :12], pad(x[0, 12:17])]), z12, fresh())
    sep2, _ = run(jnp.stack([pad(x[0, 17:]), x[1, :12]]), z12, fresh())
    assert_close(y[0, :12], sep1[0], TOL, f"{name}: first document")
    assert_close(y[0, 12:17], sep1[1, :5], TOL, f"{name}: second document")
    assert_close(y[0, 17:], sep2[0, :7], TOL, f"{name}: third document")


@pytest.mark.parametrize("name", NAMES)
def test_causal_and_finite_gradients(name):
    gdef, params, run, fresh = _setup(name)
    x, t0 = _x(3), 11

    def out_at(params, x):
        y, _ = nnx.merge(gdef, params)(x)           # no cache, no segment ids: the training call
        return jnp.sum(y[:, t0] ** 2), y

    (_, y), (gp, gx) = jax.jit(jax.value_and_grad(out_at, argnums=(0, 1), has_aux=True))(params, x)
    y_cached, _ = run(x, jnp.zeros((B, T), jnp.int32), fresh())
    assert_close(y, y_cached, TOL, f"{name}: training call vs cached call")
    gx = np.asarray(gx)
    # S4D's training call is an FFT convolution: causal up to float32 rounding, not exactly
    leak = 1e-5 * np.abs(gx).max() if CASES[name][0] == "s4d" else 0.0
    assert np.all(np.abs(gx[:, t0 + 1:]) <= leak), f"{name}: gradient from the future"
    assert np.abs(gx[:, : t0 + 1]).sum() > 0
    for path, g in jax.tree_util.tree_leaves_with_path(gp):
        assert np.isfinite(np.asarray(g)).all(), f"{name}: non-finite gradient at {path}"


# The parameter counts stated in each mixer's docstring, at D = 64, H = 4 (K = V = D / H unless
# the mixer widens them), so the documented formulas cannot drift from the code.
_D, _H, _K = 64, 4, 16
DOCUMENTED_PARAMS = {
    "attention": 4 * _D**2,
    "gated_attention": 5 * _D**2 + 2 * _K,
    "linear_attention": 4 * _D**2,
    "retnet": 8 * _D**2 + 2 * _D // _H,
    "lightning": 5 * _D**2 + _D // _H,
    "minimax_lightning": 5 * _D**2 + _D,
    "gla": 4 * _D**2 + 16 * _D + 8 * _D + _D // 2 + _D // _H,
    "hgrn2": _D * (2 * _D + _D) + _D**2 + _D // _H,
    "deltanet": 4 * _D**2 + _D * _H + 12 * _D + _D // _H,
    "efla": 4 * _D**2 + _D * _H + 12 * _D + _D // _H,
    "gated_deltanet": 8 * _D**2 + 2 * _D * _H + 2 * _H + 16 * _D + 2 * _D // _H,
    "delta_product": (_D * 5 * _D + 2 * _D * _H + _D**2 + _D * _H + 2 * _H + _D**2 + _K
                      + 4 * 5 * _D),
    "hgrn": 4 * _D**2 + _D // _H,
    "mamba": 2 * _D * 128 + 5 * 128 + 128 * (4 + 32) + 4 * 128 + 128 + 128 * 16 + 128 + 128 * _D,
    "mamba2": _D * (256 + 32 + _H) + 5 * 160 + 3 * _H + 128 + 128 * _D,
    "based": _D * (2 * _H * 16 + _D) + _D**2,
    "rebased": _D * (2 * _H * 16 + _D) + _D**2 + 2 * 16,
    "hedgehog": 4 * _D**2 + 2 * _H * (_K**2 + _K),
    "gsa": _D * (2 * _D + _D + _H * 8) + _D**2 + _K,                     # num_slots = 8
    "mom": (_D * (_D + 5 * 2 * _D) + _D * 4 + 5 * (_D * _H + 2 * _H) + 5 * _D * _H
            + 2 * _D**2 + _K + 4 * (_D + 5 * 2 * _D)),                   # M = 4
    "mlstm": 4 * _D**2 + 2 * _D * _H + 2 * _H + _D // _H,
    "hla": 5 * _D**2 + _K,
    # the base layer + D H L + H L, L = 12 levels
    "log_linear_mamba2": _D * (256 + 32 + _H) + 5 * 160 + 3 * _H + 128 + 128 * _D
    + _D * _H * 12 + _H * 12,
    "log_linear_gated_deltanet": 8 * _D**2 + 2 * _D * _H + 2 * _H + 16 * _D + 2 * _D // _H
    + _D * _H * 12 + _H * 12,
    "lte_attention": 4 * _D**2 + 4 * _D + _D + _H,
    "mamba3": _D * (256 + 32 + 3 * _H + 4) + _H + 2 * _H * 16 + 2 * 16 + _H + 128 * _D,
    "rwkv7": 4 * _D**2 + 2 * _D * (64 + 64 + 128) + 13 * _D,
    "rglru": 3 * _D**2 + 2 * _D**2 // _H + 10 * _D + _D,
    "kda": 4 * _D**2 + _D * _H + 12 * _D + _D // _H + 4 * _D**2 // _H + _H + 2 * _D,
    # n = d_v = D / H, r = D / 2H, kv_rank = D / 2
    "mla": _D * _H * 24 + _D * (32 + 8) + 32 + 32 * _H * (16 + 16) + _H * 16 * _D,
    "s4d": 2 * _D * _D + _D + 4 * _D * 32 + _D + _D * _D,                # E = D, M = 32
}


def test_documented_parameter_counts():
    assert set(DOCUMENTED_PARAMS) == set(MIXERS)
    for name, expected in DOCUMENTED_PARAMS.items():
        opts = {"num_slots": 8} if name == "gsa" else {}
        layer = nnx.eval_shape(lambda: make_mixer(name, _D, _H, rngs=nnx.Rngs(0), **opts))
        count = sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
        assert count == expected, f"{name}: {count} parameters, docstring says {expected}"


LOGICAL_AXES = {"embed", "heads", "kv", "mlp", "vocab", "experts", "conv", None}


def test_every_parameter_names_its_logical_axes():
    """Each parameter carries one logical axis name per dimension, from the shared vocabulary
    (a harness maps them onto mesh axes with its rules)."""
    from linear_jax.layers.ffn import MLP, MoE
    from linear_jax.layers.shared_moe import SharedExpertMoE
    build = {name: lambda name=name: make_mixer(name, 32, 2, rngs=nnx.Rngs(0)) for name in MIXERS}
    build["mlp"] = lambda: MLP(32, 64, rngs=nnx.Rngs(0))
    build["moe"] = lambda: MoE(32, 64, num_experts=4, rngs=nnx.Rngs(0))
    build["moe_sigmoid"] = lambda: MoE(32, 64, num_experts=4, scoring="sigmoid", score_bias=True,
                                       groups=2, rngs=nnx.Rngs(0))
    build["shared_moe"] = lambda: SharedExpertMoE(32, 64, shared_width=48, num_experts=4,
                                                  rngs=nnx.Rngs(0))
    layers = {name: nnx.eval_shape(f) for name, f in build.items()}
    for name, layer in layers.items():
        for path, p in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            axes = p.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == len(p.get_value().shape), (name, path, axes)
            assert set(axes) <= LOGICAL_AXES, (name, path, axes)
    specs = nnx.get_partition_spec(nnx.state(layers["gla"], nnx.Param))
    assert tuple(specs["q_proj"]["kernel"].get_value()) == ("embed", "heads")


def test_kernel_config_reaches_the_op_arguments():
    """`kernel_config` is kept, hashable, in the op arguments of every mixer over a linear op
    (handed to the op as `config=`); attention has no kernel config and is not given one."""
    from linear_jax.kernels.configs import TritonChunkConfig
    cfg = (TritonChunkConfig(block_v=32),)
    for name in sorted(MIXERS):
        opts = {"num_slots": 8} if name == "gsa" else {}
        layer = nnx.eval_shape(lambda name=name, opts=opts: make_mixer(
            name, _D, _H, rngs=nnx.Rngs(0), kernel_config=cfg, **opts))
        if name in ("attention", "lte_attention", "gated_attention", "mla"):  # softmax: none
            assert not hasattr(layer, "op_kw")
            continue
        assert dict(layer.op_kw)["config"] == cfg and hash(layer.op_kw), name
