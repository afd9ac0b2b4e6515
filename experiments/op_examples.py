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


_XLA = ("recurrent", "chunk")


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
    beta = (1.0 / (1.0 + np.exp(-f(B, T, H)))).astype(np.float32)
    n = 2                                                       # DeltaProduct's Householder steps
    D_ch, N = H * D, 16                                         # channels and state of the scans
    decay = lambda *s: logsig(rng.standard_normal(s).astype(np.float32) + 3.0)
    kappa = unit(f(B, T, H, D))                       # RWKV-7's removal key and learning rate
    lr = (1.0 / (1.0 + np.exp(-f(B, T, H, D)))).astype(np.float32)
    return [
        Example("linear_attention", ops.linear_attention, dict(common)),
        Example("simple_gla", ops.simple_gla, dict(common, g=decay(B, T, H))),
        Example("gla", ops.gla, dict(common, g=decay(B, T, H, D) / 4)),
        Example("delta_rule", ops.delta_rule, dict(common, k=unit(k), beta=beta)),
        Example("delta_rule[exact]", ops.delta_rule, dict(common, beta=beta), {"exact": True}),
        Example("gated_delta_rule", ops.gated_delta_rule,
                dict(common, k=unit(k), g=decay(B, T, H), beta=beta)),
        Example("delta_product", ops.delta_product,
                dict(common, k=unit(f(B, T, n, H, D)), v=f(B, T, n, H, D),
                     beta=(2.0 / (1.0 + np.exp(-f(B, T, n, H)))).astype(np.float32),
                     g=decay(B, T, H))),
        Example("ssd", ops.ssd,
                {"x": v, "dt": f(B, T, H), "A": -np.exp(f(H)), "B": f(B, T, 1, D),
                 "C": f(B, T, 1, D), "D": f(H), "dt_bias": f(H), "segment_ids": seg}),
        Example("mlstm", ops.mlstm, dict(common, i=f(B, T, H), f=f(B, T, H) + 3.0), impls=_XLA),
        Example("hgrn", ops.hgrn, {"x": f(B, T, D_ch), "g": decay(B, T, D_ch),
                                   "segment_ids": seg}, impls=_XLA),
        Example("diagonal_scan[complex]", ops.diagonal_scan,
                {"a": (np.exp(decay(B, T, D_ch) + 1j * f(B, T, D_ch))).astype(np.complex64),
                 "x": (f(B, T, D_ch) + 1j * f(B, T, D_ch)).astype(np.complex64),
                 "segment_ids": seg}, impls=_XLA),
        Example("selective_scan", ops.selective_scan,
                {"u": f(B, T, D_ch), "delta": f(B, T, D_ch), "A": -np.exp(f(D_ch, N)),
                 "B": f(B, T, N), "C": f(B, T, N), "D": f(D_ch), "z": f(B, T, D_ch),
                 "segment_ids": seg}, {"delta_softplus": True}, impls=_XLA),
        Example("kda", ops.kda, dict(common, k=unit(k), g=decay(B, T, H, D) / 4, beta=beta),
                impls=_XLA),
        Example("rwkv7", ops.rwkv7, dict(common, k=0.5 * k, g=-np.exp(-0.5) * (1.0 - np.exp(
            decay(B, T, H, D))), a=-kappa, b=kappa * lr), impls=_XLA),
        Example("mamba3", ops.mamba3, dict(common, g=decay(B, T, H), dt=np.full((B, T, H), 0.1,
                np.float32), trap=beta, theta=0.3 * f(B, T, H, D // 4)), impls=_XLA),
    ]
