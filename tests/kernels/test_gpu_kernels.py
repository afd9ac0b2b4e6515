"""The GPU (Triton) kernels of the decay family and the delta rule (KDA's vector gate included), in
Pallas interpret mode on CPU:
what the op contract suite (tests/ops/test_contract.py, impl="pallas") does not reach.

Every gate strong (g uniform in [-25, -15], and all at -20), where a gate gradient formed from
differences of cumulative sums is rounding noise; the two forward forms (one pass, two passes)
forced for the primal and under differentiation; bf16 gradients; GLA's mild and strong chunks and
four sub-chunks; the backward tiled over K; config validation. Each case checks outputs, final
states and the gradients of every float input (q, k, v, g, beta, initial_state) against the
`lax.scan` reference, with K != V (neither a power of two: the entry pads inside). Tiny shapes:
interpret mode is slow. What a case costs is compiling its programs (running them takes
milliseconds), so the cases share them where they can: one T for all (each op's reference
compiles once), the kernel's gradient and primal in one program, and cases of one op, chunk,
config and dtype reuse one another's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from linear_jax import ops
from linear_jax.kernels.configs import TritonChunkConfig
from linear_jax.kernels.gpu import decay as gpu_decay
from linear_jax.kernels.gpu import delta as gpu_delta
from tests.utils import TOL, assert_close, log_sigmoid_gates, segments

# T = 70 for every case: five chunks of C = 16 (padded to 80), two of C = 64 (padded to 128), so
# every case has more than one chunk and a partial last one
B, T, H, K, V, C = 2, 70, 2, 24, 20, 16
# op -> (the reference through the op, gate shape or None, the kernel entry)
OPS = {
    "linear_attention": (lambda q, k, v, g, **kw: ops.linear_attention(q, k, v, **kw), None,
                         gpu_decay.decay),
    "simple_gla": (ops.simple_gla, (B, T, H), gpu_decay.decay),
    "gla": (ops.gla, (B, T, H, K), gpu_decay.decay),
    "delta_rule": (lambda q, k, v, g, beta, **kw: ops.delta_rule(q, k, v, beta, **kw), None,
                   gpu_delta.delta),
    "gated_delta_rule": (ops.gated_delta_rule, (B, T, H), gpu_delta.delta),
    "kda": (ops.kda, (B, T, H, K), gpu_delta.delta),
}
DELTA = ("delta_rule", "gated_delta_rule", "kda")


def _inputs(rng, op, dtype, gate_lo=-4.0, gates=None):
    """gates: None (log-sigmoid, from gate_lo), "uniform" (in [-25, -15]) or "constant" (-20)."""
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    gshape = OPS[op][1]
    g = None
    if gshape is not None:
        g = {None: lambda: log_sigmoid_gates(rng, gshape, lo=gate_lo),
             "uniform": lambda: rng.uniform(-25.0, -15.0, gshape),
             "constant": lambda: np.full(gshape, -20.0)}[gates]()
        g = jnp.asarray(g, jnp.float32)
    x = dict(q=f(B, T, H, K), k=f(B, T, H, K), v=f(B, T, H, V), g=g,
             S0=jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32))
    if op in DELTA:  # unit keys, beta in (0, 1) as the papers use them
        x["k"] = (x["k"] / jnp.linalg.norm(x["k"].astype(jnp.float32), axis=-1,
                                           keepdims=True)).astype(dtype)
        x["beta"] = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((B, T, H)))), dtype)
    return x


def _value_and_grad(fn, x, seg, do, dS, **kw):
    """<o, do> + <S, dS> of fn's (o, S), and its (o, S)."""
    extra = (x["beta"],) if "beta" in x else ()
    o, S = fn(x["q"], x["k"], x["v"], x.get("g"), *extra, initial_state=x["S0"], segment_ids=seg,
              **kw)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(S * dS), (o, S)


@functools.cache
def _reference(op):
    """jit(value_and_grad) of the `lax.scan` reference, inputs as arguments (float32): every case
    of one op (gates, dtypes, chunks, configs and forward forms of the kernel) shares its
    compilation."""
    return jax.jit(jax.value_and_grad(
        lambda d, seg, do, dS: _value_and_grad(OPS[op][0], d, seg, do, dS, impl="recurrent"),
        has_aux=True))


@functools.cache
def _kernel(op, chunk, config, primal):
    """jit of the kernel's value_and_grad and, with `primal`, of its primal alone (its own
    custom_vjp path: no residuals) in the same program (one compilation: XLA's fixed costs and
    the kernels' tracing are paid once), inputs as arguments: the cases of one op, chunk, config
    and dtype (gates, data) share it."""
    def loss(d, seg, do, dS):
        return _value_and_grad(OPS[op][2], d, seg, do, dS, scale=K**-0.5, config=config,
                               chunk_size=chunk)

    grad = jax.value_and_grad(loss, has_aux=True)
    return jax.jit(lambda *a: (grad(*a), loss(*a)[1] if primal else None))


def _check(op, x, seg, tol, tol_state, chunk=C, config=None, primal=True):
    """primal: also run the primal alone (no residuals kept: at these sizes the one-pass forward,
    under differentiation the two-pass one) and check its outputs. config None: the default
    config, passed as `TritonChunkConfig()` (what the entry takes for None), so every case of the
    default shares programs with the cases that name it."""
    config = config or TritonChunkConfig()
    rng = np.random.default_rng(1)
    do = jnp.asarray(rng.standard_normal((B, x["q"].shape[1], H, V)), jnp.float32)
    dS = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    names = ["q", "k", "v", "S0"] + ([] if x["g"] is None else ["g"]) + (
        ["beta"] if "beta" in x else [])

    d = {n: x[n] for n in names}
    ((_, (o, S)), grads), primal_out = _kernel(op, chunk, config, primal)(d, seg, do, dS)
    (_, (ro, rS)), rgrads = _reference(op)(
        {n: v.astype(jnp.float32) for n, v in d.items()}, seg, do, dS)
    runs = [(o, S, "under grad")]
    if primal:
        runs.append((*primal_out, "primal"))
    assert o.dtype == x["v"].dtype and S.dtype == jnp.float32
    for out, state, how in runs:
        assert_close(out, ro, tol, f"{op} output ({how})")
        assert_close(state, rS, tol_state, f"{op} final state ({how})")
    for n in names:
        assert grads[n].dtype == x[n].dtype
        assert_close(grads[n], rgrads[n], tol, f"{op} d{n}")


@pytest.mark.parametrize("gates", ["uniform", "constant"])
@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_every_gate_strong(op, gates):
    """dg is ~1e-9 of the other gradients and must still match to float32 accuracy: the kernels
    route every pair's gradient through the gates of its span (kernels/tiles.py). The kernels of
    before (G = cumsum(g) in XLA, dG from differences) gave relative errors 0.75 to 110 here."""
    rng = np.random.default_rng(7)
    _check(op, _inputs(rng, op, jnp.float32, gates=gates), None, 1e-5, 1e-5)


# The backward's alternatives (`TritonChunkConfig.spans`, `gla_bwd`, `gla_diag`, `dv_pass`, the
# GLA intra tiles, `f32_dots`), each on the ops it changes, several in one case where they reach
# different code: "dot" the first exact version's span math (spans, gla_bwd="dots", the loop
# diagonal), here over two K tiles of the intra kernel (block_k_intra=16), with dv inside the one
# value loop and the products as 3xTF32 (interpret mode computes 3xTF32 as IEEE float32: this
# holds the plumbing, forward and backward, the device holds the numerics,
# `experiments/benchmarks/f32_dots_gpu.py`); "rows" the per-row terms routed by the intra kernel
# (the default, "fold", routes them in the inter-chunk kernel into one dg part), with the [c, c,
# BK] diagonal over two K tiles at 2 warps; "dv1" dv inside the one value loop; "old" "fold" and
# dv in the value loop with the intra kernel's pre-exact tiles (all of K, the loop diagonal).
# Merged here (16 cases before, 10 now): the intra kernel's K tiles are a grid axis over one
# per-channel body whatever gla_bwd says, so "loop_k16" (the loop diagonal over two K tiles) is
# in "dot" and "k16w2" (the [c, c, BK] diagonal over two K tiles, 2 warps) in "rows"; "dv1" of
# simple_gla is in "dot", of gla in "dot" and, with "fold", in "old" (gla_diag and block_k_intra
# reach only the intra kernel, whose default tiles run in "default"); "tf32x3" of gla and
# gated_delta_rule is in "dot".
VARIANTS = {"default": ({}, ("simple_gla", "gla", "gated_delta_rule", "kda")),
            "dot": (dict(spans="dot", gla_bwd="dots", gla_diag="loop", block_k_intra=16,
                         dv_pass="loop", f32_dots="tf32x3"),
                    ("simple_gla", "gla", "gated_delta_rule")),
            "rows": (dict(gla_bwd="rows", block_k_intra=16, warps_intra_bwd=2), ("gla",)),
            "dv1": (dict(dv_pass="loop"), ("linear_attention",)),
            "old": (dict(gla_bwd="fold", dv_pass="loop", gla_diag="loop", block_k_intra=128),
                    ("gla",))}


@pytest.mark.parametrize("op, variant", [
    (op, name) for name, (_, names) in VARIANTS.items() for op in names])
def test_variants_strong_chunk64(op, variant):
    """Every gate strong at C = 64 (four GLA sub-chunks: the blocked path's off-diagonal blocks
    and per-row routes across sub-chunks), with documents and an initial state, for each variant
    of the backward: exact to float32 accuracy. The primal alone runs in the op's "default" case
    and where a variant changes it (`spans`: the delta rule's UT inverse; `f32_dots`: every
    product): elsewhere it is the default case's program (the same lowered module) on the same
    inputs."""
    over, _ = VARIANTS[variant]
    primal = (variant == "default" or op not in VARIANTS["default"][1]
              or (op in DELTA and "spans" in over) or "f32_dots" in over)
    rng = np.random.default_rng(8)
    _check(op, _inputs(rng, op, jnp.float32, gates="uniform"), segments(rng, B, T, p=0.03),
           1e-5, 1e-5, chunk=64, config=TritonChunkConfig(**over), primal=primal)


# block_k = 16 < K: the backward kernels and the state passes run two K tiles (the gate's partial
# sums over K are added afterwards)
TILED = dict(block_k=16, block_k_bwd=16)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two_pass"])
@pytest.mark.parametrize("op", [op for op in OPS if op != "kda"])   # kda: backward_tiled_over_k
def test_forward_forms(op, fused):
    """The forward as one state-and-output pass (`fused.py`) or as a state pass then an output
    kernel, forced for the primal and under differentiation alike (by default, as the contract
    suite runs them: at these sizes the one-pass form for the primal, the two-pass form under
    differentiation); packed documents and an initial state. The two-pass cases also run the
    state passes and the backward over two K tiles (`TILED`; test_backward_tiled_over_k's cases
    of simple_gla, gla and gated_delta_rule were these ops at the default forms and `TILED`: the
    one-pass primal holds all of K whatever block_k says, and the one-K-tile kernels run in the
    one-pass cases' backward and in every other test)."""
    rng = np.random.default_rng(0)
    config = TritonChunkConfig(fused_fwd=True) if fused else TritonChunkConfig(fused_fwd=False,
                                                                               **TILED)
    _check(op, _inputs(rng, op, jnp.float32), segments(rng, B, T, p=0.08), TOL["float32"],
           TOL["float32"], config=config)


@pytest.mark.parametrize("op", ["simple_gla", "gla", "gated_delta_rule"])
def test_bfloat16(op):
    """(gla's programs are test_gla_mild_and_strong_chunks[bfloat16]'s.)"""
    rng = np.random.default_rng(2)
    _check(op, _inputs(rng, op, jnp.bfloat16), segments(rng, B, T, p=0.08), TOL["bfloat16"],
           TOL["float32"] * 10)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gla_mild_and_strong_chunks(dtype):
    """GLA's intra blocks take one matmul through the chunk start where the chunk's decay is mild
    and the blocked form where it is not (kernels/gpu/intra.py): chunks of both kinds in one call,
    one channel at a time crossing the limit, with documents. The intra kernels (where the limit
    is read) are the same in both forward forms and K tilings (theirs is block_k_intra): float32
    runs the programs of test_forward_forms[gla-two_pass], bf16 the default config's,
    test_bfloat16[gla]'s (the one-pass primal)."""
    from linear_jax.kernels.gpu.intra import span_limit
    rng = np.random.default_rng(6)
    x = _inputs(rng, "gla", jnp.dtype(dtype))
    lim = span_limit(jnp.dtype(dtype))
    g = np.full((B, T, H, K), -0.05, np.float32)
    g[:, 16:32] = -1.2 * lim / 16          # chunk 1: every channel past the limit
    g[:, 40:48, :, 3] = -lim / 4           # chunk 2: one channel past it
    x["g"] = jnp.asarray(g)
    config = TritonChunkConfig(fused_fwd=False, **TILED) if dtype == "float32" else None
    _check("gla", x, segments(rng, B, T, p=0.05), TOL[dtype],
           TOL["float32"] * (10 if dtype == "bfloat16" else 1), config=config)


@pytest.mark.parametrize("op", ("gla", "delta_rule", "gated_delta_rule"))
def test_four_sub_chunks(op):
    """C = 64: four 16-row sub-chunks (GLA's intra blocks, the UT transform's blocked
    substitution), with documents starting inside sub-chunks, on mild gates (gla and
    gated_delta_rule run the programs of test_variants_strong_chunk64's "default")."""
    rng = np.random.default_rng(4)
    _check(op, _inputs(rng, op, jnp.float32), segments(rng, B, T, p=0.03), TOL["float32"],
           TOL["float32"], chunk=64)


def test_config():
    cfg = TritonChunkConfig()
    assert cfg.for_chunk(8).chunk == 16 and cfg.for_chunk(100).chunk == 128
    with pytest.raises(ValueError, match="block_v"):
        TritonChunkConfig(block_v=48)
    with pytest.raises(ValueError, match="chunk"):
        TritonChunkConfig(chunk=256)
    with pytest.raises(ValueError, match="spans"):
        TritonChunkConfig(spans="matmul")
    with pytest.raises(ValueError, match="block_k_intra"):
        TritonChunkConfig(block_k_intra=24)
    with pytest.raises(ValueError, match="dv_pass"):
        TritonChunkConfig(dv_pass="first")
    with pytest.raises(ValueError, match="gla_bwd"):
        TritonChunkConfig(gla_bwd="folded")
    with pytest.raises(ValueError, match="f32_dots"):
        TritonChunkConfig(f32_dots="tf32")


@pytest.mark.parametrize("f32_dots, f32, want", [
    ("ieee", True, lax.Precision.HIGHEST),
    ("tf32x3", True, lax.DotAlgorithmPreset.TF32_TF32_F32_X3),
    ("tf32x3", False, None), ("ieee", False, None)])
def test_float32_dots(f32_dots, f32, want):
    """The products a compiled kernel body asks for (`Ctx.dot`): float32 inputs as the config's
    f32_dots says (interpret mode, the CPU's, computes both as IEEE float32, so the jaxpr is
    where they differ), bf16 inputs on their own type whatever it says."""
    from linear_jax.kernels.gpu.common import Ctx
    ctx = Ctx(TritonChunkConfig(f32_dots=f32_dots, interpret=False), f32=f32)
    dt = jnp.float32 if f32 else jnp.bfloat16
    a, b = jnp.ones((16, 32), dt), jnp.ones((16, 32), dt)
    eqn = jax.make_jaxpr(lambda a, b: ctx.dot(a, b, tb=True))(a, b).jaxpr.eqns[-1]
    assert eqn.primitive.name == "dot_general"
    prec = eqn.params["precision"]
    got = prec[0] if isinstance(prec, tuple) else prec
    if want is None:
        assert got in (None, lax.Precision.DEFAULT), prec
    else:
        assert got == want, prec
    if f32_dots == "tf32x3" and f32:
        assert all(v.aval.dtype == jnp.float32 for v in eqn.invars)


@pytest.mark.parametrize("op", ["kda"])   # the other ops: test_forward_forms' two-pass cases
def test_backward_tiled_over_k(op):
    """block_k = 16 < K (`TILED`): the backward kernels and the state passes run two K tiles (the
    gate's partial sums over K are added afterwards). kda (interpret mode is slowest there) also
    takes the GLA intra kernels' two K tiles and the one-pass forward under differentiation,
    which keeps the residuals and which the contract suite does not force."""
    rng = np.random.default_rng(5)
    _check(op, _inputs(rng, op, jnp.float32), segments(rng, B, T, p=0.08),
           TOL["float32"], TOL["float32"],
           config=TritonChunkConfig(block_k_intra=16, fused_fwd=True, **TILED))


@pytest.mark.parametrize("op, over", [
    ("simple_gla", dict(dv_pass="loop")), ("gla", dict(dv_pass="loop", gla_bwd="rows"))],
    ids=["simple_gla-dv1", "gla-dv1_rows"])
def test_one_value_pass_tiled_over_k(op, over):
    """dv_pass="loop" over two K tiles: dv written inside the value loop by the first tile's
    program only, from the keys' factors over all of K (the vector gate forms them for the whole
    chunk there, not from its own tile), with documents and every gate strong. For gla with "rows"
    (the per-row terms routed by the intra kernel, which no other case runs over two K tiles);
    gla_bwd does not reach the scalar gate's kernels. (gla with the default "fold" was a case
    too: `decay._backward_main` reads fold and dv_pass apart (the gate factors are
    `rows_out or fold`'s, the one value loop the same for both), so its code is this case's
    loop, "fold" over two K tiles in test_forward_forms[gla-two_pass] and "fold" with the loop
    in test_variants_strong_chunk64[gla-old].)"""
    rng = np.random.default_rng(9)
    _check(op, _inputs(rng, op, jnp.float32, gates="uniform"), segments(rng, B, T, p=0.08),
           1e-5, 1e-5, config=TritonChunkConfig(**TILED, **over))


@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule"])
def test_the_delta_row_passes_run_unpipelined_at_k128_under_3xtf32(op):
    """At K = 128 the delta rule's state passes and one-pass forward keep their 2 stages under IEEE
    float32 products and run unpipelined (1 stage) under 3xTF32, whose split operands took Gated
    DeltaNet's fwd + bwd past an H100's shared memory at B 8, H 16 (`chunk_state.row_stages`);
    bf16 inputs keep theirs whatever f32_dots says."""
    from experiments.benchmarks import kernel_bisect

    @functools.cache                        # ("ieee", bf16) is asked twice
    def stages(f32_dots, dtype):
        config = TritonChunkConfig(interpret=False, f32_dots=f32_dots)
        progs = kernel_bisect.programs(op, 8, 128, 16, 128, dtype, config=config,
                                       kernel="triton")
        out = {}
        for _, eqn, name, _ in kernel_bisect.distinct_kernels(progs):
            params = eqn.params["compiler_params"]
            params = params.get("triton", params) if isinstance(params, dict) else params
            out[name.split(" at ")[0]] = params.num_stages
        return {k: v for k, v in out.items() if "_state_" in k or k.endswith("fused_fwd")}

    ieee, split = stages("ieee", jnp.float32), stages("tf32x3", jnp.float32)
    assert {"delta_state_fwd", "delta_state_bwd"} <= set(ieee) and set(ieee) == set(split)
    assert set(ieee.values()) == {2} and set(split.values()) == {1}, (ieee, split)
    assert stages("tf32x3", jnp.bfloat16) == stages("ieee", jnp.bfloat16)
    assert set(stages("ieee", jnp.bfloat16).values()) == {2}
