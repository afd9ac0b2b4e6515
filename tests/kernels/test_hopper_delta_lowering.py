"""The Hopper (Mosaic GPU) delta-rule kernels lower for CUDA, forward and backward, from a CPU host.

`jax.export(..., platforms=["cuda"])` runs the Pallas -> Mosaic GPU lowering of each `plgpu.kernel`
(UT prep, forward walk, reverse walk, gradient kernel: TMA copies, mbarriers, wgmma, register
layouts); PTX assembly happens on the device only. Both ops (gated_delta_rule, delta_rule as
g = None), two shapes each, the default "lane" lowering semantics only (the one "warpgroup" export
case of the suite is in tests/kernels/test_hopper_lowering.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from linear_jax.kernels.configs import HopperDeltaConfig
from linear_jax.kernels.gpu.hopper import delta as hopper_delta
from linear_jax.kernels.gpu.hopper.common import smem_bytes
from tests.kernels.lowering import cast_round_trips, custom_call_payloads

# (semantics, B, T, H, K, V, gated, packed documents + initial state)
CASES = [
    ("lane", 2, 2048, 4, 128, 128, True, True),      # the anchor tile sizes
    ("lane", 1, 200, 2, 64, 64, True, False),        # T % 64 != 0, one value warpgroup
    ("lane", 2, 2048, 4, 128, 128, False, False),    # delta_rule at the anchor tile sizes
    ("lane", 1, 200, 2, 100, 48, False, True),       # delta_rule; K, V padded to 128, 64
]
# tests/conftest.py runs a case's tests together (pytest-xdist hands a worker consecutive tests),
# so the default config's exports, which test_two_level_walk_exports and
# test_prep_inverse_blocks_exports read again, are made once (`_export` keeps the last few)
GROUP_BY = "case"


@functools.lru_cache(maxsize=8)
def _export(case, grad, **over):
    sem, B, T, H, K, V, gated, extras = case
    cfg = HopperDeltaConfig(interpret=False, programs=132, semantics=sem, **over)
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    structs = [bf(B, T, H, K), bf(B, T, H, K), bf(B, T, H, V), f32(B, T, H)]
    structs += [f32(B, T, H)] if gated else []
    n_diff = len(structs)
    if extras:
        structs += [f32(B, H, K, V), jax.ShapeDtypeStruct((B, T), jnp.int32)]

    def f(*a):
        x, rest = list(a[:n_diff]), a[n_diff:]
        S0, seg = rest if rest else (None, None)
        g = x[4] if gated else None
        return hopper_delta.delta(x[0], x[1], x[2], g, x[3], scale=K**-0.5, initial_state=S0,
                                  segment_ids=seg, chunk_size=64, config=cfg)

    def loss(*a):
        o, S = f(*a)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    argnums = tuple(range(n_diff)) + ((n_diff,) if extras else ())
    fn = jax.grad(loss, argnums=argnums) if grad else f
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*structs)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-{'gated' if c[6] else 'delta'}-T{c[2]}-K{c[4]}V{c[5]}")
def test_delta_exports_for_cuda(case, grad):
    text = _export(case, grad).mlir_module()
    kernels = text.count("mosaic_gpu")
    assert kernels >= (4 if grad else 2), "expected the Mosaic GPU kernels in the module"
    if grad:      # the gradient kernel, an item shared by a dq side and a dk side
        assert "delta_grad_split" in text, "expected the gradient kernel"
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


def test_float32_and_wide_heads_are_refused():
    x = jnp.zeros((1, 64, 1, 64), jnp.float32)
    b = jnp.zeros((1, 64, 1), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        hopper_delta.delta(x, x, x, None, b, scale=1.0, initial_state=None, segment_ids=None,
                           chunk_size=64)
    y = jnp.zeros((1, 64, 1, 192), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 128"):
        hopper_delta.delta(y, y, y, None, b, scale=1.0, initial_state=None, segment_ids=None,
                           chunk_size=64)


def test_three_walk_stages_do_not_fit_at_128():
    cfg = HopperDeltaConfig(interpret=False, stages=3)
    x = jax.ShapeDtypeStruct((1, 256, 1, 128), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((1, 256, 1), jnp.float32)
    f = lambda q, beta: hopper_delta.delta(q, q, q, None, beta, scale=1.0, initial_state=None,
                                           segment_ids=None, chunk_size=64, config=cfg)
    with pytest.raises(ValueError, match="shared memory"):
        jax.export.export(jax.jit(f), platforms=["cuda"])(x, b)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("case", [CASES[0]], ids=["K128"])
def test_two_level_walk_exports(case, grad):
    """Four pieces: the state pass over [M | E] (a CTA per block of 64 of the K + V columns), the
    scan, the output pass from each piece's entering state; documents and an initial state. The
    default config takes four pieces at the anchor case (B H = 8 sequences of 32 chunks), so these
    are test_delta_exports_for_cuda's exports of it (`_export` keeps them), its value blocks in a
    CTA each (the split arrangement: B H P V/64 = 64 fits the SMs)."""
    sem, B, T, H, K, V, gated, extras = case
    cfg = HopperDeltaConfig()
    assert cfg.pieces_for(B * H, K, V, T // 64, 132) == 4
    assert cfg.split_walk(B * H * 4, V // 64, 132)
    text = _export(case, grad).mlir_module()
    assert "delta_walk_state" in text and "delta_walk" in text
    if grad:      # the reverse walk in pieces too
        assert "delta_walk_rev_state" in text


def test_pieces_follow_the_step_count():
    cfg = HopperDeltaConfig()
    # the anchor shapes (B H, chunks): only T = 32768 (16 sequences of 512 chunks) gains
    assert [cfg.pieces_for(bh, 128, 128, n, 132) for bh, n in ((128, 32), (32, 128), (16, 512))] \
        == [1, 1, 4]
    assert HopperDeltaConfig(pieces=8).pieces_for(16, 128, 128, 12, 132) == 4   # divides N
    with pytest.raises(ValueError, match="power of two"):
        HopperDeltaConfig(pieces=3)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["K128", "K64"])
def test_prep_two_ctas_exports(case):
    """The UT prep as CTAs of one warpgroup, two to an SM (`prep_two_ctas`): A, -W, U stored from
    the input slots and tiles they were computed in; at K = 128 A's tile aliased with the q slot
    (`plgpu.RefUnion`), at K = 64 the q slot itself. The forward (T not stored): the backward's
    prep, which stores T too, is exported (alone) at both K by
    test_prep_two_ctas_grid_and_shared_memory, and no kernel after the prep reads these config
    fields (the backward's are those of test_delta_exports_for_cuda). At K = 128 also the forward
    walk's value blocks as the consumers of one CTA per (b, h) (`walk_split=False`; every other
    K = V = 128 export here takes the split grid, a CTA each; at V = 64 there is one block)."""
    text = _export(case, False, prep_two_ctas=True, stages_prep=1, prep_inverse="doubling",
                   walk_split=False).mlir_module()
    assert text.count("mosaic_gpu") >= 2, "expected the Mosaic GPU kernels"
    assert text.count("delta_prep") == text.count("delta_prep_two_ctas") > 0, \
        "expected the two-CTA prep in place of the default one"
    assert "delta_walk" in text
    assert not cast_round_trips(text), "a float32 -> 16-bit -> float32 cast in XLA (lowering.py)"


@pytest.mark.parametrize("K", [128, 64])
def test_prep_two_ctas_grid_and_shared_memory(K, monkeypatch):
    """Twice the CTAs of the default prep (`programs` of them), one warpgroup each, and SMEM for
    two an SM: 81.75 KB at K = V = 128, 57.75 KB at 64, T included (the prep of one CTA an SM,
    by doubling: 179.5 and 115.5 KB), gated with documents (the most gate rows). Their exports
    are also the lowering of both UT kernels by doubling with T stored (the backward's) at both K,
    which test_prep_two_ctas_exports and test_prep_inverse_blocks_exports leave to them."""
    seen = {}
    launch, check = hopper_delta.launch, hopper_delta.check_smem

    def spy_launch(*a, **kw):
        seen["grid"], seen["threads"] = kw["grid"], kw["num_threads"]
        return launch(*a, **kw)

    def spy_check(*a, **kw):
        seen["smem"] = check(*a, **kw)
        return seen["smem"]

    monkeypatch.setattr(hopper_delta, "launch", spy_launch)
    monkeypatch.setattr(hopper_delta, "check_smem", spy_check)
    x = jax.ShapeDtypeStruct((1, 64 * 300, 1, K), jnp.bfloat16)         # 300 chunks
    names = ("gq", "gk", "dec", "G", "doc", "beta", "ein")              # gated, documents
    rows = jax.ShapeDtypeStruct((1, 1, len(names), 64 * 300), jnp.float32)
    found = []
    for over in ({"prep_inverse": "doubling"},
                 {"prep_two_ctas": True, "stages_prep": 1, "prep_inverse": "doubling"}):
        cfg = HopperDeltaConfig(interpret=False, programs=132, **over)
        jax.export.export(jax.jit(lambda q, k, v, r, cfg=cfg: hopper_delta.prep(
            q, k, v, r, names=names, scale=1.0, cfg=cfg, residuals=True)),
            platforms=["cuda"])(x, x, x, rows)
        found.append(dict(seen))
    default, two = found
    assert (default["grid"], default["threads"]) == ((132,), 2)
    assert (two["grid"], two["threads"]) == ((264,), 1)
    assert two["smem"] <= smem_bytes(2) < 113 * 1024
    assert two["smem"] == {128: 83712, 64: 59136}[K], two["smem"]
    assert default["smem"] > 113 * 1024


def test_check_smem_limits_per_sm():
    """One CTA an SM may take 227 KB (less 2 KB for the lowering), two 113 KB each: the two-CTA
    UT kernel is held to the second."""
    big = [jax.ShapeDtypeStruct((112 * 1024,), jnp.int8)]
    assert smem_bytes(1) == 227 * 1024 - 2048 and smem_bytes(2) == 113 * 1024 - 2048
    assert hopper_delta.check_smem("x", big) == 112 * 1024
    with pytest.raises(ValueError, match="with 2 to an SM; lower"):
        hopper_delta.check_smem("x", big, per_sm=2)


def test_config_switches_take_bools_only():
    """Every Hopper config switch is checked in one place (`_check_hopper`): 1 is not True."""
    from linear_jax.kernels.configs import HopperChunkConfig, HopperSelectiveConfig
    for cls, field in ((HopperDeltaConfig, "prep_two_ctas"),
                       (HopperChunkConfig, "gla_grad_key_blocks"),
                       (HopperSelectiveConfig, "per_thread_forward")):
        with pytest.raises(ValueError, match=f"{cls.__name__}.{field} must be True or False"):
            cls(**{field: 1})


def test_prep_two_ctas_config_is_checked():
    with pytest.raises(ValueError, match="prep_two_ctas must be True or False"):
        HopperDeltaConfig(prep_two_ctas=1)
    with pytest.raises(ValueError, match="stages_prep must be 1"):
        HopperDeltaConfig(prep_two_ctas=True, prep_inverse="doubling")  # stages_prep is 2
    assert HopperDeltaConfig(prep_two_ctas=True, stages_prep=1,
                             prep_inverse="doubling").prep_two_ctas


def _kernels(text):
    """(serialized module, MLIR text or None) of every Mosaic GPU kernel of an exported module, in
    order: the text (without debug info) of the UT kernels only, printing the others is most of
    the cost; `_asm` prints any of them."""
    from jax._src.lib.mlir import ir

    def read(bc):
        raw = ir.StringAttr(bc["module"]).value_bytes
        module = ir.Module.parse(raw)
        prep = any("delta_prep" in str(op.attributes["sym_name"]) for op in module.body.operations
                   if "sym_name" in op.attributes)
        return raw, module.operation.get_asm(enable_debug_info=False) if prep else None

    return custom_call_payloads(text, "module", read)


def _asm(raw):
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    ctx = mlir.make_ir_context()
    ctx.allow_unregistered_dialects = True
    with ctx:
        return ir.Module.parse(raw).operation.get_asm(enable_debug_info=False)


# (case, grad): the backward at K = 128 (every kernel of the two-level forward and backward beside
# the UT one compared) and the forward at K = 64 (the UT kernel without T); the doubling's UT kernel
# of the other two is exported alone by test_prep_two_ctas_grid_and_shared_memory (K = 128 and 64,
# with T), and no kernel but the UT one reads prep_inverse
@pytest.mark.parametrize("case, grad", [(CASES[0], True), (CASES[1], False)],
                         ids=["K128-bwd", "K64-fwd"])
def test_prep_inverse_blocks_exports(case, grad):
    """`prep_inverse="blocks"` (the default) against "doubling": the UT kernel solves the
    16 x 16 diagonal blocks by forward substitution (120 FMAs a column: 16 steps, 15 + 14 + ..
    + 1 updates) and merges them with the doubling's last two steps (b = 16, 32) only; the
    kernels other than the UT one unchanged."""
    text = _export(case, grad).mlir_module()              # the default: "blocks"
    base = _kernels(_export(case, grad, prep_inverse="doubling").mlir_module())
    blocks = _kernels(text)
    assert len(base) == len(blocks) >= (4 if grad else 2)
    preps = [i for i, (_, k) in enumerate(blocks) if k is not None]
    assert len(preps) == 1, "expected one UT kernel"
    p = preps[0]
    assert base[p][1] is not None
    fmas = blocks[p][1].count("math.fma")
    assert fmas == 120, fmas
    assert base[p][1].count("math.fma") == 0
    # two merge steps of two products instead of five doubling steps: 6 wgmma groups fewer
    wg = lambda k: k.count("wgmma.commit.group")  # noqa: E731
    assert wg(base[p][1]) - wg(blocks[p][1]) == 6
    # the same serialized module (what its kernel_hash hashes) is the same kernel; else the texts
    for i, ((a, _), (b, _)) in enumerate(zip(base, blocks, strict=True)):
        if i != p:
            assert a == b or _asm(a) == _asm(b), i
    assert not cast_round_trips(text)


def test_prep_inverse_config_is_checked():
    with pytest.raises(ValueError, match="prep_inverse must be one of"):
        HopperDeltaConfig(prep_inverse="solve")
    with pytest.raises(ValueError, match="prep_two_ctas does not have"):
        HopperDeltaConfig(prep_inverse="blocks", prep_two_ctas=True, stages_prep=1)
    assert HopperDeltaConfig().prep_inverse == "blocks"
    with pytest.raises(ValueError, match="set prep_inverse='doubling'"):
        HopperDeltaConfig(prep_two_ctas=True, stages_prep=1)
