"""The GPU element-wise scan kernel (`hgrn` / `diagonal_scan`), called through its entries with a
config: what the op contract suite (`tests/ops/test_contract.py`, which runs every impl on small
single-block shapes) does not reach.

In Pallas interpret mode on CPU, against the `lax.scan` reference (outputs, final states and the
gradients of every float input through both): several channel blocks with the last one padded,
the chunk loop with a tail, T shorter than a chunk (the tail alone), bf16 read and written in place
(bf16 gradients). The config's tile choice and validation. The Triton lowering of forward and
backward (`jax.export` for "cuda" from a CPU host). Tiny chunks: interpret mode unrolls a chunk's
steps, so its trace grows with the chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax.kernels.configs import TritonScanConfig
from linear_jax.kernels.gpu import elementwise
from linear_jax.ops.diagonal_scan import diagonal_scan
from linear_jax.ops.hgrn import hgrn
from tests.kernels.lowering import export_scan
from tests.utils import TOL, assert_close, log_sigmoid_gates, segments

F32_TOL = 1e-5
# two channel blocks of 32 for D = 40 (the second one 24 channels of padding); chunks of 4 steps
SMALL = TritonScanConfig(chunk=4, chunk_bwd=4, block_d=32, min_block_d=32)


def _inputs(rng, op, dtype, B, T, D):
    if op == "hgrn":
        first = log_sigmoid_gates(rng, (B, T, D))
    else:                          # negative transitions too
        first = np.tanh(2 * rng.standard_normal((B, T, D)))
    return dict(a=jnp.asarray(first, dtype), x=jnp.asarray(rng.standard_normal((B, T, D)), dtype),
                h0=jnp.asarray(rng.standard_normal((B, D)), jnp.float32))


def _run(op, d, seg, impl, config=None):
    """The op's reference (impl "recurrent") or the kernel entry with `config`."""
    kw = dict(initial_state=d["h0"], segment_ids=seg)
    if impl == "recurrent":
        fn = hgrn if op == "hgrn" else diagonal_scan
        kw["impl"] = "recurrent"
    else:
        fn = elementwise.hgrn if op == "hgrn" else elementwise.diagonal_scan
        kw.update(chunk_size=64, config=config)
    return fn(d["x"], d["a"], **kw) if op == "hgrn" else fn(d["a"], d["x"], **kw)


def _check(op, inp, seg, tol, config):
    B, T, D = inp["x"].shape
    rng = np.random.default_rng(1)
    dy = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)

    def loss(impl, d):
        h, S = _run(op, d, seg, impl, config)
        return jnp.sum(h.astype(jnp.float32) * dy) + jnp.sum(S * dS), (h, S)

    vg = lambda impl: jax.jit(jax.value_and_grad(lambda d: loss(impl, d), has_aux=True))
    (_, (h, S)), grads = vg("pallas")(inp)
    (_, (rh, rS)), rgrads = vg("recurrent")({n: v.astype(jnp.float32) for n, v in inp.items()})
    assert h.dtype == inp["x"].dtype and S.dtype == jnp.float32
    assert_close(h, rh, tol, f"{op} output")
    assert_close(S, rS, 1e-4 if tol > F32_TOL else F32_TOL, f"{op} final state")
    for n in inp:
        assert grads[n].dtype == inp[n].dtype, n
        assert_close(grads[n], rgrads[n], tol, f"{op} d{n}")


@pytest.mark.parametrize("op", ["hgrn", "diagonal_scan"])
def test_channel_blocks_chunks_and_documents(op):
    """D = 40 over two blocks of 32 (the second mostly padding), T = 19 in chunks of 4 (four
    chunks and a 3-step tail, both directions), resets inside chunks, an initial state."""
    rng = np.random.default_rng(0)
    seg = jnp.asarray(segments(rng, 2, 19, p=0.15))
    _check(op, _inputs(rng, op, jnp.float32, 2, 19, 40), seg, F32_TOL, SMALL)


def test_bfloat16_in_place_and_short_sequence():
    """bf16 x and g read as bf16 and h written as bf16 (state and arithmetic float32; the
    gradients come back in bf16), T = 3 shorter than the chunk: only the static tail runs."""
    rng = np.random.default_rng(2)
    _check("hgrn", _inputs(rng, "hgrn", jnp.bfloat16, 2, 3, 40), None, TOL["bfloat16"], SMALL)


def test_config_tiles_and_validation():
    cfg = TritonScanConfig()
    # channel blocks halve while B * D / BD is below min_programs, down to min_block_d
    assert cfg.block(2, 40) == 32 and cfg.block(64, 4096) == 128 and cfg.block(8, 2048) == 32
    assert cfg.num_warps(32) == 1 and cfg.num_warps(256) == 8
    assert TritonScanConfig.default().min_programs == cfg.min_programs
    assert TritonScanConfig.default(type("Dev", (), {"core_count": 8})()).min_programs == 16
    for bad in (dict(block_d=48), dict(min_block_d=8), dict(chunk=0), dict(chunk_bwd=129),
                dict(warps=3), dict(interpret="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TritonScanConfig(**bad)


COMPILED = TritonScanConfig(interpret=False)
# (op, dtype, B, T, D, documents and initial state)
LOWERING = [("hgrn", jnp.bfloat16, 2, 200, 96, True),           # D padded to the channel block
            ("diagonal_scan", jnp.complex64, 4, 4096, 2048, False)]  # full blocks, two planes


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("case", LOWERING, ids=lambda c: f"{c[0]}-{jnp.dtype(c[1]).name}-T{c[3]}")
def test_lowers_to_triton(case, grad):
    """The forward, and under `jax.grad` forward and backward, lower through Pallas' Triton path."""
    op, dtype, b, t, d, extras = case
    sds = jax.ShapeDtypeStruct
    state = sds((b, d), jnp.complex64 if dtype == jnp.complex64 else jnp.float32)
    text = export_scan(elementwise.hgrn if op == "hgrn" else elementwise.diagonal_scan,
                       [sds((b, t, d), dtype)] * 2, state if extras else None, platform="cuda",
                       grad=grad, config=COMPILED)
    assert 'name = "elementwise_scan_fwd"' in text
    assert ('name = "elementwise_scan_bwd"' in text) == grad
    assert "num_warps" in text
