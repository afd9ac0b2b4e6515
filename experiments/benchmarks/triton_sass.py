"""What the Triton compiler makes of each Pallas kernel, on a CPU host: registers, spills, shared
memory and SASS instruction counts per kernel, without a GPU.

    pip install triton==3.6.0        # the device's version; its wheel bundles ptxas / nvdisasm
    python -m experiments.benchmarks.triton_sass [--ops simple_gla gla gated_delta_rule]
        [--old 7c716e1] [--variants default,...] [--T 256] [--docs] [--json out.json]

Traces fwd+bwd of each op's kernel entry for "cuda" (`jax.export`, config interpret=False),
captures the Triton IR that Pallas hands to XLA (`lower_jaxpr_to_triton_module`, with the
kernel's num_warps / num_stages), and compiles it with the `triton` package for sm_90 (H100 /
H200): `cuobjdump --dump-resource-usage` gives registers and stack (spill) bytes, `nvdisasm` the
SASS, counted by opcode: HGMMA (wgmma tensor-core), HMMA (mma.sync), FFMA / FADD / FMUL (CUDA
cores), MUFU (exp2 and friends), SHFL (cross-lane reductions), LDL / STL (local memory: spills),
LDS / STS / LDSM (shared memory: layout conversions, dot operands), BAR (barriers). XLA compiles
the same IR with its own bundled Triton on the device, so the numbers are the pip build's: close,
not identical. `--old COMMIT` compiles that commit's kernels too (`old_kernels.py`).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import export
from jax._src.pallas.triton import lowering as _tl
from jax._src.pallas.triton import pallas_call_registration as _reg

from linear_jax.kernels.configs import TritonChunkConfig

TRITON = "__gpu$xla.gpu.triton"
OPCODES = ("HGMMA", "HMMA", "FFMA", "FADD", "FMUL", "FSEL", "FSETP", "MUFU", "SHFL", "LDL", "STL",
           "LDS", "STS", "LDSM", "LDG", "STG", "BAR")
_CAPTURED: list = []


def _capture(*a, **kw):
    res = _orig(*a, **kw)
    f = inspect.currentframe().f_back.f_locals          # pallas_call_lowering's locals
    _CAPTURED.append(dict(name=f.get("name"), num_warps=f.get("num_warps"),
                          num_stages=f.get("num_stages"),
                          asm=res.module.operation.get_asm(enable_debug_info=False)))
    return res


_orig = _tl.lower_jaxpr_to_triton_module


def capture(fn, *args) -> list:
    """[{name, num_warps, num_stages, asm}] of every Triton kernel in fn(*args) lowered for cuda."""
    _CAPTURED.clear()
    _reg.lowering.lower_jaxpr_to_triton_module = _capture
    try:
        export.export(jax.jit(fn), platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    finally:
        _reg.lowering.lower_jaxpr_to_triton_module = _orig
    return list(_CAPTURED)


def nvidia_tool(name: str) -> str:
    """The path of a CUDA tool (ptxas, cuobjdump, nvdisasm) bundled with the `triton` wheel."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def opcode_counts(sass: str) -> collections.Counter:
    """How often each opcode appears in nvdisasm's SASS listing (predicates dropped)."""
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def compile_stats(k: dict) -> dict:
    """Registers, stack bytes (spills), shared memory and SASS opcode counts of one kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{k['name']}.ttir")
        with open(src, "w") as f:
            f.write(k["asm"])
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=k["num_warps"], num_stages=k["num_stages"]))
        cub = os.path.join(tmp, "k.cubin")
        with open(cub, "wb") as f:
            f.write(c.asm["cubin"])
        res = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", cub],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", cub], capture_output=True,
                              text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    ops = opcode_counts(sass)
    return dict(warps=k["num_warps"], regs=int(m.group(1)), stack=int(m.group(2)),
                smem=c.metadata.shared, instr=sum(ops.values()),
                **{o: ops.get(o, 0) for o in OPCODES})


def op_fn(op, entry, B, T, H, K, V, docs, config):
    """(loss gradient fn, its ShapeDtypeStructs) for one op through a kernel entry."""
    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    gate = {"simple_gla": (B, T, H), "gla": (B, T, H, K), "gated_delta_rule": (B, T, H),
            "delta_rule": None, "linear_attention": None}[op]
    delta = "delta" in op
    args = [sds((B, T, H, K), bf), sds((B, T, H, K), bf), sds((B, T, H, V), bf),
            sds((B, H, K, V), jnp.float32)]
    if gate is not None:
        args.append(sds(gate, jnp.float32))
    if delta:
        args.append(sds((B, T, H), bf))
    if docs:
        args.append(sds((B, T), jnp.int32))

    def loss(q, k, v, S0, *rest):
        rest = list(rest)
        g = rest.pop(0) if gate is not None else None
        beta = rest.pop(0) if delta else None
        seg = rest.pop(0) if docs else None
        kw = dict(scale=K**-0.5, initial_state=S0, segment_ids=seg, chunk_size=64)
        if config is not None:
            kw["config"] = config
        o, S = entry(q, k, v, g, beta, **kw) if delta else entry(q, k, v, g, **kw)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(S)

    n = len(args) - (1 if docs else 0)
    return jax.grad(loss, argnums=tuple(range(n))), args


VARIANTS = {"default": {}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ops", nargs="+", default=["simple_gla", "gla", "gated_delta_rule"])
    p.add_argument("--old", default=None, help="also compile this commit's kernels")
    p.add_argument("--variants", default="default",
                   help="comma-separated TritonChunkConfig overrides, as in bwd_gpu.VARIANTS")
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--docs", action="store_true")
    p.add_argument("--only", default="backward,wy,intra_backward,state_bwd",
                   help="substrings of kernel names to compile (all: '')")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from experiments.benchmarks import bwd_gpu
    from linear_jax.kernels.gpu import decay, delta
    shape = dict(B=1, T=a.T, H=2, K=128, V=128, docs=a.docs)
    runs = []
    if a.old:
        from experiments.benchmarks import old_kernels
        old = old_kernels.load(a.old)
        for op in a.ops:
            entry = old["delta"].delta if "delta" in op else old["decay"].decay
            with old_kernels.lowered_for_gpu(old):
                fn, args = op_fn(op, entry, config=None, **shape)
                runs.append(("old", op, capture(fn, *args)))
    for name in a.variants.split(","):
        cfg = TritonChunkConfig(interpret=False, **bwd_gpu.VARIANTS[name])
        for op in a.ops:
            entry = delta.delta if "delta" in op else decay.decay
            fn, args = op_fn(op, entry, config=cfg, **shape)
            runs.append((name, op, capture(fn, *args)))
    rows = []
    only = [s for s in a.only.split(",") if s]
    for tag, op, kernels in runs:
        for k in kernels:
            if only and not any(s in k["name"] for s in only):
                continue
            r = dict(tag=tag, op=op, kernel=k["name"], **compile_stats(k))
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
