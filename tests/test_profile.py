"""`experiments/benchmarks/profile.py` on a CPU: no device trace (an empty breakdown), and
`fusion_text` finding a fusion of a compiled module by its kernel name."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from experiments.benchmarks import profile


def _compiled_text():
    f = jax.jit(lambda x, y: jnp.sum(jnp.exp(x.T) * y, axis=0))
    return f.lower(jnp.ones((64, 32)), jnp.ones((32, 64))).compile().as_text()


def test_no_device_plane_gives_an_empty_breakdown():
    times = profile.kernel_times(jax.jit(lambda x: x * 2), jnp.ones(8), reps=2)
    assert times == {}
    assert "no device trace" in profile.format_times(times)


def test_fusion_text_shows_the_named_fusion_and_its_computation():
    hlo = _compiled_text()
    names = re.findall(r"^\s*(?:ROOT )?%?(\w*fusion[\w.]*) = ", hlo, re.M)
    assert names, hlo
    text = profile.fusion_text(hlo, [names[0], "no_such_fusion"], lines=50)
    assert text.startswith(f"--- {names[0]}: ")
    assert "no_such_fusion" not in text
    # the fused computation's body follows the call: the exponential inside it
    assert "exponential(" in text
