"""The GPU mLSTM kernel (`mlstm`, impl="pallas"), in Pallas interpret mode on CPU.

Outputs and the final state (C, n, m) against the `lax.scan` reference and the float64 loop, and
the gradients of every float input (q, k, v, i, f and the three parts of the initial state)
against the `lax.scan` reference through the op, with random cotangents on h and on every part of
the state: grouped heads, packed documents, an initial state,
T not a multiple of the chunk, K and V that the kernel pads, fp32 and bf16 (the reference runs on
the same bf16 values), and extreme gates (input gates to +-40 and a span of input gates below -80,
where the normaliser's floor binds; forget gates to -30). The Triton lowering of forward and
backward at two shapes; the benchmark's --quick run. Tiny shapes: interpret mode is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import mlstm as gpu_mlstm
from linear_jax.ops.mlstm import mlstm
from tests.ops.spec_ssm import mlstm_reference
from tests.utils import assert_close, segments

TRITON = "__gpu$xla.gpu.triton"
NAMES = ("q", "k", "v", "i", "f", "C0", "n0", "m0")


def _inputs(rng, B, T, Hk, H, K, V, dtype, i_range=(-4.0, 6.0), f_range=(-2.0, 5.0)):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    u = lambda lo_hi, *s: jnp.asarray(rng.uniform(*lo_hi, s), dtype)
    st = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(q=f(B, T, Hk, K), k=f(B, T, Hk, K), v=f(B, T, H, V), i=u(i_range, B, T, H),
                f=u(f_range, B, T, H), C0=st(B, H, K, V), n0=st(B, H, K), m0=st(B, H))


def _check(x, seg, chunk, tol, with_state=True, grad_ref="recurrent"):
    """h and (C, n, m) against the lax.scan reference and the float64 loop, the gradients of every
    float input against `grad_ref` (through h and every part of the final state)."""
    rng = np.random.default_rng(7)
    cot = lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32)
    dh, dC, dn, dm = cot(x["v"]), cot(x["C0"]), cot(x["n0"]), cot(x["m0"])
    s0 = lambda d: (d["C0"], d["n0"], d["m0"]) if with_state else None

    def loss(impl, d):
        h, (C, n, m) = mlstm(d["q"], d["k"], d["v"], d["i"], d["f"], initial_state=s0(d),
                             segment_ids=seg, chunk_size=chunk, impl=impl)
        return (jnp.sum(h.astype(jnp.float32) * dh) + jnp.sum(C * dC) + jnp.sum(n * dn)
                + jnp.sum(m * dm)), (h, (C, n, m))

    vg = lambda impl: jax.jit(jax.value_and_grad(lambda d: loss(impl, d), has_aux=True))
    (_, (h, S)), grads = vg("pallas")(x)
    if grad_ref == "recurrent":
        (_, (rh, rS)), rgrads = vg("recurrent")(x)
    else:                 # the lax.scan reference's outputs alone: its gradients are not used
        _, (rh, rS) = jax.jit(lambda d: loss("recurrent", d))(x)
        _, rgrads = vg(grad_ref)(x)
    h64, S64 = mlstm_reference(x["q"], x["k"], x["v"], x["i"], x["f"], s0(x), seg,
                               x["q"].shape[-1] ** -0.5)
    assert h.dtype == x["v"].dtype and all(s.dtype == jnp.float32 for s in S)
    assert_close(h, rh, tol, "h")
    assert_close(h, h64.astype(np.float32), tol, "h (float64 loop)")
    for name, a, b, c in zip("Cnm", S, rS, S64, strict=True):
        assert_close(a, b, tol, f"final {name}")
        assert_close(a, c, tol, f"final {name} (float64 loop)")
    for n in NAMES if with_state else NAMES[:5]:
        assert grads[n].dtype == x[n].dtype, n
        assert_close(grads[n], rgrads[n], tol, f"d{n}")


def test_float32_grouped_heads_documents_state():
    """Hk = 1 key head for H = 2 value heads; T = 37 in chunks of 16 (padded to 48); K = 12 (padded
    to 16), V = 40 (padded to 48: three value tiles of 16 in every kernel); documents starting
    inside chunks; an initial (C, n, m)."""
    rng = np.random.default_rng(0)
    x = _inputs(rng, 2, 37, 1, 2, 12, 40, jnp.float32, i_range=(-4.0, 4.0))
    _check(x, jnp.asarray(segments(rng, 2, 37, p=0.08)), 16, 1e-5)


def test_bfloat16():
    """bf16 q, k, v and gates; T = 21 in chunks of 16; documents and an initial state.
    The float64 loop runs on the same bf16 values."""
    rng = np.random.default_rng(1)
    x = _inputs(rng, 1, 21, 2, 2, 16, 16, jnp.bfloat16)
    _check(x, jnp.asarray(segments(rng, 1, 21, p=0.1)), 16, 1e-2)


def test_extreme_gates():
    """Input gates in [-40, 40] with a stretch below -80 (m falls below -80 there: the floor
    exp(min(-m, 80)) binds and h ~ 0), forget gates in [-30, 8]; no documents, zero state.

    Gradients against the chunk form (XLA's autodiff, not the kernel's hand-written backward):
    where m jumps from -95 to +40 the float32 lax.scan reference's dq is off by ~1e-3 (float64
    finite differences side with the chunk form and the kernel, which agree to ~1e-5)."""
    rng = np.random.default_rng(2)
    x = _inputs(rng, 1, 40, 1, 1, 16, 16, jnp.float32, i_range=(-40.0, 40.0),
                f_range=(-30.0, 8.0))
    x["i"] = x["i"].at[:, 5:20].set(-95.0 + x["i"][:, 5:20] / 8)
    _check(x, None, 16, 1e-5, with_state=False, grad_ref="chunk")


@pytest.mark.parametrize("shape", [(jnp.bfloat16, 1, 300, 64, 48, "ieee"),
                                   (jnp.float32, 2, 100, 128, 128, "ieee"),
                                   (jnp.float32, 2, 100, 128, 128, "tf32x3")],
                         ids=["bf16-T300-64x48", "f32-T100-128x128", "f32-tf32x3"])
def test_lowers_to_triton(shape):
    """The forward alone and under jax.grad, through a config with interpret=False. T = 300 (padded
    to 320, not a power of two: whole-T blocks are only read in chunks), V = 48 (three value tiles
    of 16); and float32 at K = V = 128, its products IEEE and 3xTF32 (`f32_dots`)."""
    dt, B, T, K, V, f32_dots = shape
    H = 2
    sds = jax.ShapeDtypeStruct
    args = (sds((B, T, H, K), dt), sds((B, T, H, K), dt), sds((B, T, H, V), dt),
            sds((B, T, H), jnp.float32), sds((B, T, H), jnp.float32),
            (sds((B, H, K, V), jnp.float32), sds((B, H, K), jnp.float32), sds((B, H), jnp.float32)),
            sds((B, T), jnp.int32))

    def loss(q, k, v, i, f, s0, seg):
        h, S = gpu_mlstm.mlstm(q, k, v, i, f, scale=K**-0.5, initial_state=s0, segment_ids=seg,
                               chunk_size=64, eps=1e-6,
                               config=TritonChunkConfig(interpret=False, f32_dots=f32_dots))
        return jnp.sum(h.astype(jnp.float32)) + sum(jnp.sum(s) for s in S)

    lower = lambda f: export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()
    primal, text = lower(loss), lower(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
    for name in ("mlstm_state_fwd", "mlstm_output"):
        assert f'name = "{name}"' in primal, name
    for name in ("mlstm_state_fwd", "mlstm_output", "mlstm_state_bwd", "mlstm_backward"):
        assert f'name = "{name}"' in text, name


def test_benchmark_quick_runs(tmp_path, monkeypatch):
    from experiments.benchmarks import common, mlstm_gpu
    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    assert mlstm_gpu.main(["--quick"]) == 0
    assert list(tmp_path.glob("mlstm_gpu_*.json"))

