"""Every TPU kernel of the chunk family and mLSTM's lowers for TPU, forward and backward, checked
from a CPU host through a config with interpret=False (the selective scan's: test_tpu_selective.py).

`jax.export(..., platforms=["tpu"])` runs the Pallas -> Mosaic TPU lowering (block-shape rules,
the kernel body's lowering rules) and leaves one `tpu_custom_call` per pallas_call in the module.
Mosaic's own layout passes run later, inside the TPU compiler, and are not exercised here.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from linear_jax.kernels.configs import TpuConfig
from linear_jax.kernels.tpu import delta_rule as tpu_delta
from linear_jax.kernels.tpu import gla as tpu_gla
from linear_jax.kernels.tpu import mlstm as tpu_mlstm
from linear_jax.kernels.tpu import simple_gla as tpu_sgla

COMPILED = TpuConfig(interpret=False)
# op -> (kernel, gate: None | "scalar" | "vector", takes beta)
KERNELS = {
    "simple_gla": (tpu_sgla.simple_gla, "scalar", False),
    "gla": (tpu_gla.gla, "vector", False),
    "delta_rule": (tpu_delta.delta_rule, None, True),
    "gated_delta_rule": (tpu_delta.delta_rule, "scalar", True),
}
# (dtype, B, T, H, K, V, packed documents + initial state)
SHAPES = [
    ("bfloat16", 2, 2048, 4, 128, 128, True),    # realistic, MXU-aligned
    ("float32", 1, 1000, 2, 64, 96, False),      # T % chunk != 0, K and V padded to 128
]


def _export(op, shape, grad):
    fn, gate, beta = KERNELS[op]
    dtype, B, T, H, K, V, extras = shape
    dt = jnp.dtype(dtype)
    sd = lambda *s: jax.ShapeDtypeStruct(s, dt)
    structs = [sd(B, T, H, K), sd(B, T, H, K), sd(B, T, H, V)]
    structs += {None: [], "scalar": [sd(B, T, H)], "vector": [sd(B, T, H, K)]}[gate]
    structs += [sd(B, T, H)] if beta else []
    n_diff = len(structs)
    if extras:
        structs += [jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
                    jax.ShapeDtypeStruct((B, T), jnp.int32)]

    def f(*a):
        a = list(a)
        x, rest = a[:n_diff], a[n_diff:]
        S0, seg = rest if rest else (None, None)
        x = x[:3] + ([] if gate else [None]) + x[3:]
        return fn(*x, scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64,
                  config=COMPILED)

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    argnums = tuple(range(n_diff + (1 if extras else 0)))
    target = jax.grad(loss, argnums=argnums) if grad else f
    return jax.export.export(jax.jit(target), platforms=["tpu"])(*structs).mlir_module()


def _name(op):
    return "delta_rule" if op == "gated_delta_rule" else op


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-T{s[2]}-K{s[4]}-V{s[5]}")
@pytest.mark.parametrize("op", list(KERNELS))
def test_forward_lowers_to_one_mosaic_call(op, shape):
    text = _export(op, shape, grad=False)
    assert len(re.findall(r"tpu_custom_call", text)) == 1
    assert f"{_name(op)}_fwd" in text


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-T{s[2]}-K{s[4]}-V{s[5]}")
@pytest.mark.parametrize("op", list(KERNELS))
def test_gradient_lowers_to_forward_and_backward_mosaic_calls(op, shape):
    text = _export(op, shape, grad=True)
    assert len(re.findall(r"tpu_custom_call", text)) == 2
    assert f"{_name(op)}_fwd" in text and f"{_name(op)}_bwd" in text


def _export_mlstm(shape, grad):
    dtype, B, T, H, K, V, extras = shape
    f32 = jnp.float32
    sd = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, jnp.dtype(dt))    # noqa: E731
    structs = [sd(B, T, H, K), sd(B, T, H, K), sd(B, T, H, V), sd(B, T, H, dt=f32),
               sd(B, T, H, dt=f32)]
    if extras:
        structs += [sd(B, H, K, V, dt=f32), sd(B, H, K, dt=f32), sd(B, H, dt=f32),
                    sd(B, T, dt=jnp.int32)]

    def f(q, k, v, i, fg, *rest):
        state, seg = (tuple(rest[:3]), rest[3]) if rest else (None, None)
        return tpu_mlstm.mlstm(q, k, v, i, fg, scale=K**-0.5, initial_state=state,
                               segment_ids=seg, chunk_size=64, eps=1e-6, config=COMPILED)

    def loss(*a):
        h, (C, n, m) = f(*a)
        return jnp.sum(h.astype(f32)) + jnp.sum(C) + jnp.sum(n) + jnp.sum(m)

    argnums = tuple(range(8 if extras else 5))
    target = jax.grad(loss, argnums=argnums) if grad else f
    return jax.export.export(jax.jit(target), platforms=["tpu"])(*structs).mlir_module()


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-T{s[2]}-K{s[4]}-V{s[5]}")
def test_mlstm_lowers_to_mosaic_calls(shape, grad):
    """V = 128 takes a second lane block for the normaliser's column of ones; V = 96 has it in
    the padding."""
    text = _export_mlstm(shape, grad)
    assert len(re.findall(r"tpu_custom_call", text)) == 1 + grad
    assert "mlstm_fwd" in text and ("mlstm_bwd" in text) == grad
