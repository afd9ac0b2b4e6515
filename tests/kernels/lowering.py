"""Exporting a scan kernel for its platform from a CPU host, for the lowering tests.

`jax.export(..., platforms=["cuda"])` runs the Pallas-to-Triton lowering and `["tpu"]` the Pallas
to Mosaic TPU one without the device: a kernel that uses an operation its target cannot express
fails in CI instead of on the device. The kernel must run with `config.interpret=False`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax import export

TRITON = "__gpu$xla.gpu.triton"     # the custom call a Triton kernel lowers to (not yet stable)
_CONVERT = re.compile(r"(%[\w#]+) = stablehlo\.convert (%[\w#]+) : \(tensor<(?:[^>]*x)?(\w+)>\)"
                      r" -> tensor<(?:[^>]*x)?(\w+)>")           # scalars (tensor<f32>) too


def cast_round_trips(text: str) -> list[str]:
    """The values of an exported module (outside its kernels' payloads) converted from float32 to
    a 16-bit float and back to float32. XLA's GPU compiler drops such a round trip (it allows
    excess precision by default), so a hi / lo split written with one computes lo = 0 on the
    device; `kernels/gpu/hopper/common.split_hi_lo_xla` rounds with reduce_precision instead."""
    found = []
    for func in text.split("func.func")[1:]:       # SSA names are numbered afresh in each
        narrowed = {}
        for out, src, a, b in _CONVERT.findall(func):
            if a == "f32" and b in ("bf16", "f16"):
                narrowed[out] = src
            elif a in ("bf16", "f16") and b == "f32" and src in narrowed:
                found.append(narrowed[src])
    return found


def custom_call_payloads(text: str, key: str, read) -> list:
    """`read(backend_config)` for every custom call of an exported module's text whose
    backend_config dictionary holds `key` (a Triton kernel's "ir", a Mosaic GPU kernel's
    "module"), in order; `read` runs inside the MLIR context that parsed the module."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    ctx = mlir.make_ir_context()
    ctx.allow_unregistered_dialects = True
    found = []
    with ctx:
        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for o in block.operations:
                        attrs = o.operation.attributes
                        if o.operation.name == "stablehlo.custom_call" and \
                                "mhlo.backend_config" in attrs:
                            bc = attrs["mhlo.backend_config"]
                            if isinstance(bc, ir.DictAttr) and key in bc:
                                found.append(read(bc))
                        walk(o.operation)
        walk(ir.Module.parse(text).operation)
    return found


def triton_kernels(text: str) -> list[tuple[str, str]]:
    """(name, Triton IR text without locations) of every Triton kernel in an exported module's
    text: the MLIR bytecode each custom call carries in its backend_config ("ir"), parsed back."""
    from jax._src.lib.mlir import ir

    def read(bc):
        kernel = ir.Module.parse(ir.StringAttr(bc["ir"]).value_bytes)
        return ir.StringAttr(bc["name"]).value, kernel.operation.get_asm(enable_debug_info=False)

    return custom_call_payloads(text, "ir", read)


def export_scan(entry, arrays, state=None, *, platform: str, grad: bool, **kw) -> str:
    """The module text of `entry(*arrays, initial_state=, segment_ids=, chunk_size=64, **kw)`
    exported for `platform` ("cuda" or "tpu"); with `grad`, of the gradient of the sum of |outputs|
    (every output leaf, in float32) with respect to every array, which traces forward and backward.

    arrays: ShapeDtypeStructs, the first [B, T, ...]. state: the initial state's, then also packed
    documents; None: neither."""
    B, T = arrays[0].shape[:2]
    n = len(arrays)
    docs = jax.ShapeDtypeStruct((B, T), jnp.int32)
    args = list(arrays) + ([] if state is None else [state, docs])

    def f(*a):
        h0, seg = (None, None) if state is None else a[n:]
        return entry(*a[:n], initial_state=h0, segment_ids=seg, chunk_size=64, **kw)

    target = f
    if grad:
        def loss(*a):
            return sum(jnp.sum(jnp.abs(o).astype(jnp.float32)) for o in jax.tree.leaves(f(*a)))
        target = jax.grad(loss, argnums=tuple(range(n + (state is not None))))
    checks = [export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
    return export.export(jax.jit(target), platforms=[platform], disabled_checks=checks)(
        *args).mlir_module()


def hopper_exports() -> dict:
    """{family: (export(case, grad) -> jax Exported, cases)} of the Hopper (Mosaic GPU) lowering
    tests: what tools/kernel_fingerprint.py and tools/ptxas_report.py compile."""
    from tests.kernels import test_hopper_delta_lowering as t_delta
    from tests.kernels import test_hopper_gla_lowering as t_gla
    from tests.kernels import test_hopper_lowering as t_decay
    from tests.kernels import test_hopper_ssm_lowering as t_ssm

    return {"decay": (t_decay._export, t_decay.CASES), "delta": (t_delta._export, t_delta.CASES),
            "gla": (t_gla._export, t_gla.CASES),
            "selective": (t_ssm._export_selective, t_ssm.SELECTIVE),
            "mlstm": (t_ssm._export_mlstm, t_ssm.MLSTM)}
