"""Realistic random inputs for every op, shared by the check script and the CPU benchmarks.

Keys are l2-normalised where the papers normalise them, gates are log-sigmoid decays, and every
example carries packed-document segment ids, so the scripts exercise the same paths as training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from linear_jax import ops


@dataclasses.dataclass
class Example:
    name: str
    fn: Callable
    inputs: dict            # array arguments by parameter name
    static: dict = dataclasses.field(default_factory=dict)
    impls: tuple[str, ...] = ("recurrent", "chunk", "pallas")


def _segments(rng, B, T, mean_len=300):
    return np.cumsum(rng.uniform(size=(B, T)) < 1.0 / mean_len, axis=1).astype(np.int32)


def examples(B: int, T: int, H: int, D: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    logsig = lambda x: (-np.logaddexp(0.0, -x)).astype(np.float32)
    seg = _segments(rng, B, T)
    q, k, v = f(B, T, H, D), f(B, T, H, D), f(B, T, H, D)
    common = {"q": q, "k": k, "v": v, "segment_ids": seg}
    out = [
        Example("linear_attention", ops.linear_attention, dict(common)),
        Example("simple_gla", ops.simple_gla, dict(common, g=logsig(f(B, T, H) + 3.0))),
        Example("gla", ops.gla, dict(common, g=logsig(f(B, T, H, D) + 3.0) / 4)),
    ]
    return out
