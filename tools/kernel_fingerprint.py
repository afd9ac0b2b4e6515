"""Fingerprints of the compiled Hopper kernels: proof that a refactor leaves them unchanged.

    python tools/kernel_fingerprint.py /tmp/before [decay delta gla selective mlstm]
    ... refactor ...
    python tools/kernel_fingerprint.py /tmp/after && diff -r /tmp/before /tmp/after

Exports every Hopper kernel family for CUDA (the "lane" cases of the lowering tests, forward and
backward) and writes one text file per case: the outer module printed without debug info, then
each Mosaic GPU kernel module (MLIR bytecode inside its custom call's backend_config, which embeds
file:line locations and whose sha256 is the kernel_hash) parsed and printed without debug info.
Moving code between functions or files changes no byte of it; any change to what a kernel computes
or how it is laid out does. The Hopper kernels run numerically only on an H100/H200, so a
refactor made without one must leave an empty diff here.
"""
import os
import pathlib
import re
import sys

from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo's tests/
from tests.kernels.lowering import custom_call_payloads, hopper_exports  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

STR = r'"(?:[^"\\]|\\.)*"'


def render(text):
    def read(bc):
        return ir.Module.parse(ir.StringAttr(bc["module"]).value_bytes).operation.get_asm(
            enable_debug_info=False)

    kernels = custom_call_payloads(text, "module", read)
    ctx = mlir.make_ir_context()
    ctx.allow_unregistered_dialects = True
    with ctx:
        main = ir.Module.parse(text).operation.get_asm(enable_debug_info=False)
    n = iter(range(10**6))
    main = re.sub(r"kernel_hash = " + STR, "kernel_hash = <hash>", main)
    main = re.sub(r"module = " + STR, lambda _: f"module = <kernel {next(n)}>", main)
    parts = [main] + [f"// ===== kernel {i}\n{k}" for i, k in enumerate(kernels)]
    return "\n".join(parts), len(kernels)


only = sys.argv[2:]
for fam, (fn, cases) in hopper_exports().items():
    if only and fam not in only:
        continue
    for i, case in enumerate(cases):
        if case[0] != "lane":
            continue
        for grad in (False, True):
            name = f"{fam}_{i}_{'bwd' if grad else 'fwd'}"
            text, nk = render(fn(case, grad).mlir_module())
            assert nk > 0, name
            assert ".py" not in text and "loc(" not in text, name
            with open(os.path.join(out, name + ".mlir"), "w") as f:
                f.write(text)
            print(name, nk, "kernels", len(text), flush=True)
