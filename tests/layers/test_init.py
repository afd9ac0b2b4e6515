"""The model's `init_std` reaches every projection of every mixer: each dense kernel is drawn with
the std the layer was given (the gate projections of GLA, DeltaNet's beta, the decay of Gated
DeltaNet, ... once kept the 0.02 default whatever the model asked for). Mamba's dt_proj is the
one exception, initialised as in the paper (std = dt_rank^-1/2)."""

import jax
import numpy as np
import pytest
from flax import nnx

from linear_jax.layers import MIXERS, make_mixer

D, H = 64, 2
OWN_INIT = ("dt_proj",)            # kernels with the paper's own initialisation


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("std", [0.02, 0.5])
def test_every_dense_kernel_has_the_given_std(name, std):
    layer = make_mixer(name, D, H, rngs=nnx.Rngs(0), std=std)
    kernels = {jax.tree_util.keystr(path): np.asarray(v)
               for path, v in jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Param))
               if "kernel" in jax.tree_util.keystr(path)
               and not any(o in jax.tree_util.keystr(path) for o in OWN_INIT)}
    assert kernels, name
    for path, w in kernels.items():
        assert abs(w.std() / std - 1) < 0.3, f"{name}{path}: std {w.std():.4f}, asked {std}"
