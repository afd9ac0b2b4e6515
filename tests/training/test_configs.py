"""The experiment configs that name mixers build valid models: every `quickstart_mixers` and
`lm_mixers` entry (its init std reaching the model), the state-tracking configs with
DeltaProduct, and the GLA task configs' width-scaled init."""

import jax
import pytest
from flax import nnx

from experiments.configs import (
    icl_regression,
    lm_mixers,
    lm_shakespeare,
    mqar,
    quickstart_mixers,
    selective_copy,
    state_tracking,
)
from linear_jax.models import LM
from linear_jax.training import data
from linear_jax.training.loop import lm_config


def _model_config(c):
    vocab = data.make_source(c.task, split="train", batch_size=1, seed=0).vocab_size
    return lm_config(c.model, vocab)


@pytest.mark.parametrize("name", quickstart_mixers.MIXERS + tuple(quickstart_mixers.HYBRIDS))
def test_quickstart_mixers_config_builds(name):
    cfg = _model_config(quickstart_mixers.get_config(name))
    assert cfg.init_std == cfg.d_model ** -0.5
    assert cfg.layer_mixers() == quickstart_mixers.HYBRIDS.get(name, (name,) * cfg.num_layers)
    jax.eval_shape(lambda: nnx.split(LM(cfg, rngs=nnx.Rngs(0)))[1])


@pytest.mark.parametrize("name", lm_mixers.MIXERS)
def test_lm_mixers_config_builds(name):
    cfg = _model_config(lm_mixers.get_config(name))
    assert cfg.init_std == cfg.d_model ** -0.5 and cfg.layer_mixers() == (name,) * cfg.num_layers
    jax.eval_shape(lambda: nnx.split(LM(cfg, rngs=nnx.Rngs(0)))[1])


@pytest.mark.parametrize("task", state_tracking.TASKS)
def test_state_tracking_with_delta_product_builds(task):
    c = state_tracking.get_config(task)
    c.model.mixer = "delta_product"
    cfg = _model_config(c)
    assert cfg.options("delta_product") == {"allow_neg_eigval": True, "gated": False,
                                            "num_householder": 2}
    jax.eval_shape(lambda: nnx.split(LM(cfg, rngs=nnx.Rngs(0)))[1])


@pytest.mark.parametrize("module", [icl_regression, lm_shakespeare, mqar, selective_copy],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_gla_task_configs_scale_their_init_with_the_width(module):
    """init_std 0 in a config is d_model^-1/2 of the model built, after a width override."""
    c = module.get_config()
    assert c.model.init_std == 0.0 and _model_config(c).init_std == c.model.d_model ** -0.5
    c.model.d_model = 32
    assert _model_config(c).init_std == 32 ** -0.5


def test_unknown_quickstart_mixer_raises():
    with pytest.raises(ValueError, match="not one of"):
        quickstart_mixers.get_config("no_such_mixer")
    with pytest.raises(ValueError, match="not one of"):
        lm_mixers.get_config("no_such_mixer")
