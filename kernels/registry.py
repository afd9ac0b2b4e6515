"""Which ops have Pallas kernels, and where they live.

One line per kernel: `op -> {platform family: "module:function"}`. Modules are imported on first
call, so importing the ops never imports Pallas. On a CPU backend the GPU kernel runs in interpret
mode (the TPU one where no GPU kernel exists).
"""

from __future__ import annotations

import importlib

import jax

_KERNELS: dict[str, dict[str, str]] = {
    # linear_attention (and its normalised form) runs on simple_gla's kernel with g = None
    "simple_gla": {"gpu": "linear_jax.kernels.gpu.decay:decay",
                   "tpu": "linear_jax.kernels.tpu.simple_gla:simple_gla"},
    "gla": {"gpu": "linear_jax.kernels.gpu.decay:decay",
            "tpu": "linear_jax.kernels.tpu.gla:gla"},
    "delta_rule": {"gpu": "linear_jax.kernels.gpu.delta:delta",
                   "tpu": "linear_jax.kernels.tpu.delta_rule:delta_rule"},
    "gated_delta_rule": {"gpu": "linear_jax.kernels.gpu.delta:delta",
                         "tpu": "linear_jax.kernels.tpu.delta_rule:delta_rule"},
    "hgrn": {"gpu": "linear_jax.kernels.gpu.elementwise:hgrn"},
    "diagonal_scan": {"gpu": "linear_jax.kernels.gpu.elementwise:diagonal_scan"},
    "selective_scan": {"gpu": "linear_jax.kernels.gpu.selective:selective_scan",
                       "tpu": "linear_jax.kernels.tpu.selective:selective_scan_op"},
    "mlstm": {"gpu": "linear_jax.kernels.gpu.mlstm:mlstm"},
}


def _family(backend: str) -> str:
    return {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(backend, "cpu")


def _load(path: str):
    module, fn = path.split(":")
    return getattr(importlib.import_module(module), fn)


def kernels_for(op: str) -> dict:
    """`{"pallas": callable}` when `op` has a kernel for the current backend, else `{}`."""
    entries = _KERNELS.get(op, {})
    family = _family(jax.default_backend())
    path = entries.get(family) or (
        entries.get("gpu") or entries.get("tpu") if family == "cpu" else None
    )
    if path is None:
        return {}

    def run(*args, **kwargs):
        return _load(path)(*args, **kwargs)

    return {"pallas": run}
