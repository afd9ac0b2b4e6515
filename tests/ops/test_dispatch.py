"""The op registry: how `impl` resolves per platform and shape, how configs are matched to the
kernel that runs, and that every op entry goes through it (`linear_jax.ops.registry`)."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from linear_jax import ops
from linear_jax.kernels.configs import TpuConfig, TritonChunkConfig, TritonScanConfig
from linear_jax.ops import registry
from linear_jax.ops.registry import Kernel, OpRecord

OPS_DIR = pathlib.Path(ops.__file__).parent
CHUNK_CFG = "linear_jax.kernels.configs:TritonChunkConfig"


@pytest.fixture
def on(monkeypatch):
    """on("gpu", (9, 0)): resolve as on that platform (and CUDA compute capability)."""
    def set_platform(platform, capability=None):
        monkeypatch.setattr(registry, "_platform", lambda: platform)
        monkeypatch.setattr(registry, "_capability", lambda: capability)
    return set_platform


@pytest.mark.parametrize(
    "platform,op,T,expected",
    [
        ("gpu", "gla", 1024, "pallas:mosaic_gpu"),   # with the gradient per key block (session 18)
        ("tpu", "simple_gla", 1024, "pallas:tpu"),
        ("tpu", "gated_delta_rule", 1024, "pallas:tpu"),
        ("cpu", "gla", 1024, "chunk"),               # interpret mode is for tests only
        ("gpu", "delta_product", 1024, "chunk"),     # no kernel
        ("cpu", "hgrn", 1024, "recurrent"),          # element-wise scans on a CPU
        ("cpu", "selective_scan", 1024, "recurrent"),
        ("cpu", "short_conv", 1024, "chunk"),        # not element-wise in the registry's sense
        ("gpu", "hgrn", 1024, "pallas:triton"),
        ("tpu", "hgrn", 1024, "chunk"),              # a GPU kernel only
        ("gpu", "selective_scan", 1024, "pallas:mosaic_gpu"),   # timed against Triton (session 20)
        ("tpu", "selective_scan", 1024, "pallas:tpu"),
        ("gpu", "mlstm", 1024, "pallas:triton"),
        ("tpu", "mlstm", 1024, "chunk"),             # its kernel awaits the device check
        ("gpu", "ssd", 1024, "pallas:mosaic_gpu"),   # simple_gla's kernels (device-checked)
        ("gpu", "simple_gla", 1024, "pallas:mosaic_gpu"),
        ("gpu", "gated_delta_rule", 1024, "pallas:mosaic_gpu"),   # device-checked again
        ("gpu", "delta_rule", 1024, "pallas:mosaic_gpu"),
        ("gpu", "kda", 1024, "pallas:triton"),        # device-checked and timed (session 17)
        ("tpu", "linear_attention", 1024, "pallas:tpu"),
        ("gpu", "gla", 1, "recurrent"),              # one decoding step
        ("tpu", "ssd", 1, "recurrent"),
        ("cpu", "delta_rule", 1, "recurrent"),
    ],
)
def test_auto_per_platform(on, platform, op, T, expected):
    on(platform, (9, 0) if platform == "gpu" else None)
    choice = registry.resolve(op, "auto", T)
    assert choice.impl == expected
    assert choice.is_kernel == expected.startswith("pallas")


def test_auto_on_a_cpu_never_picks_a_kernel():
    for op in registry.records():
        for T in (1, 7, 4096):
            assert not registry.resolve(op, "auto", T).is_kernel, (op, T)


def test_explicit_impls_are_honoured_or_refused(on):
    on("gpu", (9, 0))
    assert registry.resolve("gla", "chunk", 1).impl == "chunk"        # even for one step
    assert registry.resolve("gla", "recurrent", 4096).impl == "recurrent"
    with pytest.raises(ValueError, match=r"delta_product: impl='pallas'.*available: "
                                         r"\['recurrent', 'chunk'\]"):
        registry.resolve("delta_product", "pallas", 10)
    with pytest.raises(ValueError, match=r"^gla: impl must be one of"):
        registry.resolve("gla", "triton", 10)
    with pytest.raises(ValueError, match=r"^gla: unknown kernel backend in impl='pallas:cuda'"):
        registry.resolve("gla", "pallas:cuda", 10)
    with pytest.raises(ValueError, match=r"^hgrn: impl='pallas:tpu': this op has no tpu kernel; "
                                         r"available: .*'pallas:triton'"):
        registry.resolve("hgrn", "pallas:tpu", 10)
    with pytest.raises(ValueError, match=r"^ssd: impl must be a string"):
        registry.resolve("ssd", None, 10)
    with pytest.raises(ValueError, match=r"^gla: impl must be one of"):   # only pallas: has one
        registry.resolve("gla", "chunk:triton", 10)


def test_unknown_op():
    with pytest.raises(ValueError, match=r"registry: no op 'retention'; known: .*'simple_gla'"):
        registry.record("retention")


def test_backend_names(on):
    """On a CPU bare "pallas" takes the Triton kernel, else the TPU one, in interpret mode; any
    interpretable backend can be named; on an accelerator "pallas" is that platform's kernel."""
    assert registry.resolve("gla", "pallas", 64).impl == "pallas:triton"
    assert registry.resolve("gla", "pallas:tpu", 64).impl == "pallas:tpu"
    assert registry.resolve("selective_scan", "pallas:tpu", 64).impl == "pallas:tpu"
    on("tpu")
    assert registry.resolve("gla", "pallas", 64).impl == "pallas:tpu"
    with pytest.raises(ValueError, match="hgrn: impl='pallas': no kernel of this op runs"):
        registry.resolve("hgrn", "pallas", 64)
    with pytest.raises(ValueError, match="the triton kernel does not run"):
        registry.resolve("mlstm", "pallas:triton", 64)
    # interpret=False is an explicit compile for the kernel's own platform (an export)
    cfg = TritonChunkConfig(interpret=False)
    assert registry.resolve("mlstm", "pallas:triton", 64, cfg).config is cfg


def test_available():
    kernels = ["pallas", "pallas:mosaic_gpu", "pallas:triton", "pallas:tpu"]
    assert registry.available("gla") == ["recurrent", "chunk", *kernels]
    assert registry.available("ssd") == registry.available("simple_gla")
    assert registry.available("linear_attention") == registry.available("simple_gla")
    assert registry.available("hgrn") == ["recurrent", "chunk", "pallas", "pallas:triton"]
    assert registry.available("delta_product") == ["recurrent", "chunk"]
    assert registry.available("short_conv") == ["recurrent", "chunk"]
    assert registry.record("gated_delta_rule").seq_parallel == (
        "linear_jax.parallel.delta:gated_delta_rule")
    assert registry.record("mlstm").seq_parallel is None


def test_config_matching():
    """A lone config must be the kernel's; from a tuple each kernel takes its own type (at most
    one), else its default; the XLA forms carry none."""
    tri, tpu = TritonChunkConfig(block_v=32), TpuConfig(chunk=32)
    assert registry.resolve("gla", "pallas:triton", 64, tri).config is tri
    assert registry.resolve("gla", "pallas:triton", 64).config == TritonChunkConfig.default()
    assert registry.resolve("gla", "pallas:triton", 64, (tpu, tri)).config is tri
    assert registry.resolve("gla", "pallas:tpu", 64, (tpu, tri)).config is tpu
    assert registry.resolve("gla", "pallas:tpu", 64, (tri,)).config == TpuConfig.default()
    with pytest.raises(ValueError, match=r"gla: config TpuConfig does not configure the triton "
                                         r"kernel .*takes TritonChunkConfig"):
        registry.resolve("gla", "pallas:triton", 64, tpu)
    with pytest.raises(ValueError, match="hgrn: config TritonChunkConfig does not configure"):
        registry.resolve("hgrn", "pallas", 64, tri)
    assert registry.resolve("hgrn", "pallas", 64, (tri, TritonScanConfig(chunk=8))).config == (
        TritonScanConfig(chunk=8))
    with pytest.raises(ValueError, match="gla: config holds 2 configs of type TritonChunkConfig"):
        registry.resolve("gla", "pallas:triton", 64, (tri, TritonChunkConfig()))
    for impl in ("chunk", "recurrent", "auto"):       # "auto" on a CPU: an XLA form
        assert registry.resolve("gla", impl, 64, tpu).config is None
    for bad in ({"chunk": 64}, (tri, "fast"), TritonChunkConfig):
        with pytest.raises(ValueError, match="gla: config must be a kernel config"):
            registry.resolve("gla", "chunk", 64, bad)


@pytest.fixture
def fake_op(monkeypatch):
    """A record "fake" with a Hopper-only kernel first, an unchecked Triton one, and a TPU one."""
    rec = OpRecord("fake", reference=lambda *a, **k: "reference", chunk=lambda *a, **k: "chunk",
                   kernels=(Kernel("mosaic_gpu", "m:f", CHUNK_CFG, min_capability=(9, 0),
                                   max_capability=(9, 0)),
                            Kernel("triton", "m:f", CHUNK_CFG, auto=False),
                            Kernel("tpu", "m:f", "linear_jax.kernels.configs:TpuConfig")))
    monkeypatch.setitem(registry._RECORDS, "fake", rec)
    return rec


def test_kernel_order_capability_and_device_check(on, fake_op):
    on("gpu", (9, 0))
    assert registry.resolve("fake", "auto", 512).impl == "pallas:mosaic_gpu"
    assert registry.resolve("fake", "pallas", 512).impl == "pallas:mosaic_gpu"
    on("gpu", (10, 0))                    # a B200: no wgmma
    assert registry.resolve("fake", "pallas", 512).impl == "pallas:triton"
    on("gpu", (8, 0))                     # an A100: the Hopper kernel does not run here
    assert registry.resolve("fake", "pallas", 512).impl == "pallas:triton"
    assert registry.resolve("fake", "auto", 512).impl == "chunk"     # triton: not device-checked
    with pytest.raises(ValueError, match="the mosaic_gpu kernel does not run on"):
        registry.resolve("fake", "pallas:mosaic_gpu", 512)
    on("cpu")                             # Mosaic GPU has no interpret mode
    assert registry.resolve("fake", "pallas", 512).impl == "pallas:triton"
    with pytest.raises(ValueError, match="the mosaic_gpu kernel does not run on cpu"):
        registry.resolve("fake", "pallas:mosaic_gpu", 512)


def refuse_float32(q, *rest):
    """An `accepts` hook: bf16 only."""
    return None if q.dtype == jnp.bfloat16 else f"takes bfloat16, got {q.dtype}"


def test_kernels_decline_inputs_and_checked_kernels_come_first(on, monkeypatch):
    hook = f"{__name__}:refuse_float32"
    hopper = Kernel("mosaic_gpu", "m:f", CHUNK_CFG, min_capability=(9, 0), accepts=hook)
    rec = OpRecord("fake2", chunk=lambda *a, **k: "chunk",
                   kernels=(hopper, Kernel("triton", "m:f", CHUNK_CFG)))
    monkeypatch.setitem(registry._RECORDS, "fake2", rec)
    on("gpu", (9, 0))
    bf16, f32 = jnp.zeros((1, 8, 1, 4), jnp.bfloat16), jnp.zeros((1, 8, 1, 4), jnp.float32)
    for impl in ("auto", "pallas"):
        assert registry.resolve("fake2", impl, 8, args=(bf16,)).impl == "pallas:mosaic_gpu"
        assert registry.resolve("fake2", impl, 8, args=(f32,)).impl == "pallas:triton"
    with pytest.raises(ValueError, match="fake2: impl='pallas:mosaic_gpu': takes bfloat16"):
        registry.resolve("fake2", "pallas:mosaic_gpu", 8, args=(f32,))
    # an unchecked kernel is reachable by name, and bare "pallas" prefers a checked one
    rec = dataclasses.replace(rec, kernels=(dataclasses.replace(hopper, auto=False),
                                            rec.kernels[1]))
    monkeypatch.setitem(registry._RECORDS, "fake2", rec)
    for impl in ("auto", "pallas"):
        assert registry.resolve("fake2", impl, 8, args=(bf16,)).impl == "pallas:triton"
    assert registry.resolve("fake2", "pallas:mosaic_gpu", 8, args=(bf16,)).is_kernel


def test_delta_rule_ops_take_the_triton_kernels_to_256_on_a_gpu(on):
    """Gated DeltaNet at K = V = 256 goes to the Triton kernels on a GPU as the gate-free delta
    rule does: their delta passes run unpipelined past K = 128 (`chunk_state.row_stages`), which
    brought the backward under an H100's shared memory (run there vmapped at MQAR's d512). Past
    K = 256 they decline (`kernels/gpu/common.py:accepts`); V is tiled and free."""
    on("gpu", (9, 0))
    arrays = lambda d, dt=jnp.bfloat16: (jnp.zeros((1, 8, 1, d), dt),) * 3
    for op in ("gated_delta_rule", "delta_rule"):
        assert registry.resolve(op, "auto", 64, args=arrays(256)).impl == "pallas:triton"
        assert registry.resolve(op, "pallas:triton", 64,
                                args=arrays(256, jnp.float32)).impl == "pallas:triton"
    assert registry.resolve("gated_delta_rule", "auto", 64, args=arrays(128)).impl == \
        "pallas:mosaic_gpu"
    # values are tiled, so V past 256 is taken: Gated DeltaNet's layer at d512 has K = 256, V = 512
    # (its check on an H100: benchmarks/results/check_gpu_*_split_gated_delta_rule_*_v2.json)
    wide_v = (jnp.zeros((1, 8, 1, 256), jnp.bfloat16),) * 2 + (
        jnp.zeros((1, 8, 1, 512), jnp.bfloat16),)
    for op in ("gated_delta_rule", "delta_rule", "kda"):
        assert registry.resolve(op, "auto", 64, args=wide_v).impl == "pallas:triton"
    # past K = 256 every delta-rule op's Triton kernels decline: key rows outgrow shared memory
    for op in ("gated_delta_rule", "delta_rule", "kda"):
        assert registry.resolve(op, "auto", 64, args=arrays(512)).impl == "chunk"
        with pytest.raises(ValueError, match=rf"{op}: impl='pallas:triton'.*K=512, V=512"):
            registry.resolve(op, "pallas:triton", 64, args=arrays(512))


def test_decay_ops_take_the_triton_kernels_to_256_on_a_gpu(on):
    """simple_gla, gla and the ops on their kernels (linear_attention, ssd) go to the Triton kernels
    up to K = 256 (Based's compact Taylor map: 153 features) and decline past it, where their
    one-pass forward and output kernel ask more shared memory than a GPU has: "auto" takes the chunk
    form instead of failing at launch, and naming the kernel says why."""
    on("gpu", (9, 0))
    arrays = lambda d: ((jnp.zeros((1, 8, 1, d), jnp.bfloat16),) * 2
                        + (jnp.zeros((1, 8, 1, 64), jnp.bfloat16),))
    for op in ("simple_gla", "gla", "linear_attention", "ssd"):
        for d in (153, 256):
            assert registry.resolve(op, "auto", 64, args=arrays(d)).impl == "pallas:triton", op
        assert registry.resolve(op, "auto", 64, args=arrays(273)).impl == "chunk", op
        with pytest.raises(ValueError, match=rf"{op}: impl='pallas:triton'.*K=273, V=64"):
            registry.resolve(op, "pallas:triton", 64, args=arrays(273))


@pytest.mark.parametrize("op", ["simple_gla", "gla", "linear_attention", "ssd", "delta_rule",
                                "gated_delta_rule", "kda"])
def test_auto_leaves_float32_inputs_of_the_triton_chunk_kernels_to_the_chunk_form(on, op):
    """Their float32 products run on the CUDA cores, slower than the chunk form in 7 of the 9
    cells measured on an H100 (`kernels/gpu/common.py:auto_declines`): "auto" takes the chunk form
    for float32 and the kernels for bf16 / fp16 (at K = 256, past the Mosaic GPU kernels' widths,
    so Triton is the kernel in question); named, the Triton kernels still run float32."""
    on("gpu", (9, 0))
    for dt, want in ((jnp.float32, "chunk"), (jnp.bfloat16, "pallas:triton"),
                     (jnp.float16, "pallas:triton")):
        args = (jnp.zeros((1, 8, 1, 256), dt),) * 3
        assert registry.resolve(op, "auto", 64, args=args).impl == want, (op, dt)
    args = (jnp.zeros((1, 8, 1, 256), jnp.float32),) * 3
    for impl in ("pallas", "pallas:triton"):
        assert registry.resolve(op, impl, 64, args=args).impl == "pallas:triton"
    # one float32 operand among bf16 makes the kernels compute in float32: declined too
    mixed = (jnp.zeros((1, 8, 1, 256), jnp.bfloat16),) * 2 + (jnp.zeros((1, 8, 1, 256)),)
    assert registry.resolve(op, "auto", 64, args=mixed).impl == "chunk"


def test_records_are_checked():
    with pytest.raises(ValueError, match="Kernel: backend must be one of"):
        Kernel("cuda", "m:f", CHUNK_CFG)
    with pytest.raises(ValueError, match="Kernel: fn must be a 'module:attribute' string"):
        Kernel("triton", "m.f", CHUNK_CFG)
    with pytest.raises(ValueError, match="registry: op 'gla' is registered twice"):
        registry.register(OpRecord("gla"))
    assert registry.register(registry.record("gla")) is registry.record("gla")   # idempotent


def _spy_kernel(*arrays, config, chunk_size, **kw):
    _spy_kernel.seen.append(config)
    ref = registry.record("simple_gla").reference
    return ref(*arrays, **kw)


def test_op_entries_pass_the_config_to_the_kernel(monkeypatch):
    """Through the entries: the kernel gets the config of its type (via ssd and linear_attention
    too, which resolve under their own names and hand the choice to simple_gla)."""
    spy = Kernel("triton", f"{__name__}:_spy_kernel", CHUNK_CFG)
    rec = dataclasses.replace(registry.record("simple_gla"), kernels=(spy,))
    monkeypatch.setitem(registry._RECORDS, "simple_gla", rec)
    monkeypatch.setattr(_spy_kernel, "seen", [], raising=False)
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q, k, v, g = f(1, 8, 2, 4), f(1, 8, 2, 4), f(1, 8, 2, 4), -jnp.abs(f(1, 8, 2))
    cfg = TritonChunkConfig(block_v=16)
    o, _ = ops.simple_gla(q, k, v, g, impl="pallas", config=(TpuConfig(), cfg))
    want, _ = ops.simple_gla(q, k, v, g, impl="recurrent")
    np.testing.assert_allclose(o, want)
    ops.linear_attention(q, k, v, impl="pallas:triton", config=cfg)
    ops.ssd(v, jnp.abs(g), -jnp.ones(2), k, q, impl="pallas", config=cfg)
    ops.simple_gla(q, k, v, g, impl="pallas")
    assert _spy_kernel.seen == [cfg, cfg, cfg, TritonChunkConfig.default()]
    with pytest.raises(ValueError, match="ssd: config TpuConfig does not configure"):
        ops.ssd(v, jnp.abs(g), -jnp.ones(2), k, q, impl="pallas", config=TpuConfig())


def test_ops_import_no_kernel_module():
    """Ops reach kernels only through the registry's strings, so importing them never imports
    Pallas and no op module can form a loop with kernels/."""
    for path in OPS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("linear_jax.kernels") for n in names), path.name
