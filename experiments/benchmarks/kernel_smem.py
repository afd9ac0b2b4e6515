"""Shared memory each Triton kernel of an op asks for on a Hopper GPU, found from a CPU host.

    pip install triton        # the compiler; not a dependency of linear_jax
    python -m experiments.benchmarks.kernel_smem --op gated_delta_rule --D 256 --dtype float32

A kernel that asks for more shared memory than the GPU has fails at launch ("Shared memory size
limit exceeded"), which interpret mode cannot see and a lent GPU costs minutes to show. This script
lowers every Pallas Triton kernel of the op's primal and gradient (`kernel_bisect.programs`, the
check_gpu inputs, compiled lowering forced) to Triton IR on the CPU, with the num_warps and
num_stages the kernel was given, and compiles each for sm_90 with the `triton` package. Triton's
version is not the one inside the device's XLA, so the bytes differ a little from the device's
(session 26: Gated DeltaNet's reverse state pass, 272,148 B here against 280,596 B on an H100):
a kernel near the limit still needs the device. `--f32-dots tf32x3` builds the kernels with
3xTF32 float32 products, where the two differ more: at B 8, H 16, K = V = 128 the delta rule's
passes with 2 stages asked up to 279,556 B here and ran on an H100 (session 35). Prints one
line a kernel and writes benchmarks/results/kernel_smem_<op>_B<B>_T<T>_H<H>_D<D>_<dtype>[_tf32x3]
.json; exits 1 when one is over `--limit`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile

import jax.numpy as jnp

from experiments.benchmarks import check_gpu, common, kernel_bisect
from linear_jax.kernels.configs import TritonChunkConfig

H100_SMEM = 232_448     # bytes a block may use on an H100 or H200 (227 KiB)


@contextlib.contextmanager
def _capturing_ttir(found: list):
    """Records the Triton IR of every Pallas kernel lowered for a GPU inside the block."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module

    def record(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        found.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = record
    try:
        yield
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower


def kernels(op, B, T, H, D, dtype, V=None, f32_dots="ieee") -> list[dict]:
    """Every distinct Triton kernel of the op's primal and gradient: phase, name, its Triton IR
    (text) and the num_warps / num_stages it was given."""
    # the compiled lowering, also on a CPU
    config = TritonChunkConfig(interpret=False, f32_dots=f32_dots)
    rows = []
    # the delta-rule ops' Triton kernels are called directly, past their `accepts`, to measure
    # the widths those decline; the other ops reach theirs through impl="pallas" with this config
    kernel = "triton" if op in check_gpu.DELTA else None
    progs = kernel_bisect.programs(op, B, T, H, D, dtype, config=config, kernel=kernel, V=V)
    for phase, eqn, name, _ in kernel_bisect.distinct_kernels(progs):
        found: list[str] = []
        fn, args = kernel_bisect.alone(eqn)
        with _capturing_ttir(found):
            fn.trace(*args).lower(lowering_platforms=("cuda",))
        params = eqn.params["compiler_params"]
        params = params.get("triton", params) if isinstance(params, dict) else params
        rows.append(dict(phase=phase, kernel=name.split(" at ")[0], ttir=found[-1],
                         num_warps=params.num_warps, num_stages=params.num_stages))
    return rows


def shared_bytes(ttir: str, num_warps: int, num_stages: int, arch: int = 90) -> int:
    """Shared memory (bytes) Triton gives the kernel on sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")      # silences 3.9's notice
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.ttir"
        path.write_text(ttir)
        compiled = triton.compile(str(path), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    return int(compiled.metadata.shared)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kernel_bisect.case_args(p, op="gated_delta_rule", ops=check_gpu.OPS, dtype="float32",
                            D=256)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--limit", type=int, default=H100_SMEM)
    p.add_argument("--f32-dots", default="ieee", choices=("ieee", "tf32x3"),
                   help="TritonChunkConfig.f32_dots (float32 inputs only)")
    a = p.parse_args(argv)
    rows = kernels(a.op, a.B, a.T, a.H, a.D, getattr(jnp, a.dtype), V=a.V, f32_dots=a.f32_dots)
    for r in rows:
        r["shared"] = shared_bytes(r.pop("ttir"), r["num_warps"], r["num_stages"], a.arch)
        r["ok"] = r["shared"] <= a.limit
        print(f"{'ok  ' if r['ok'] else 'OVER'} {r['phase']:<6} {r['kernel']:<24} warps "
              f"{r['num_warps']} stages {r['num_stages']}: {r['shared']:,} B", flush=True)
    over = sum(not r["ok"] for r in rows)
    import triton
    wide = f"_V{a.V}" if a.V and a.V != a.D else ""
    dots = "_tf32x3" if a.f32_dots == "tf32x3" else ""
    path = common.write_json(f"kernel_smem_{a.op}_B{a.B}_T{a.T}_H{a.H}_D{a.D}{wide}_{a.dtype}"
                             f"{dots}.json",
                             rows, op=a.op,
                             B=a.B, T=a.T, H=a.H, D=a.D, V=a.V or a.D, dtype=a.dtype, arch=a.arch,
                             limit=a.limit, f32_dots=a.f32_dots, triton=triton.__version__,
                             over=over)
    print(f"{len(rows)} kernels, {over} over {a.limit:,} B; wrote {path}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
