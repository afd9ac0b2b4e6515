"""Registers, spills and stack of every Hopper (Mosaic GPU) kernel, from a CPU host with no GPU.

    PYTHONPATH=. python tools/ptxas_report.py [--families gla delta ...] [--cases 0 2]
        [--grad] [--json out.json]

Each kernel family is exported for CUDA as in its lowering test (`tests/kernels/
test_hopper_*_lowering.py`, the "lane" cases: the anchor tile sizes first), and every Mosaic GPU
module of the export is compiled by the same compiler the device runs: `MosaicGpuCompile` of
jax's CUDA PJRT plugin (MLIR passes, LLVM's NVPTX backend, then `ptxas -v`), with the plugin's
dumps on (`MOSAIC_GPU_DUMP_PTX`, `MOSAIC_GPU_DUMP_PTXAS`). It stops where the module would be
loaded onto a GPU; the PTX and ptxas's report are written by then. Printed per kernel: registers
per thread (255 is the ceiling), spill stores / loads and stack bytes, and ptxas's warnings
(e.g. C7512: wgmma serialised). With `--keep DIR` the PTX and pass logs stay in DIR. With
`--sass` each PTX is also assembled to a cubin and disassembled (`cuobjdump -sass`, from the
`nvidia-cuda-cuobjdump` wheel, fetched like the plugin; the device has no disassembler either):
the kernel's static instruction count and, per loop (a backward branch's range), its
instructions and most frequent opcodes: what a level loop spends its issue slots on.

What it needs, none of it installed into the environment (jax would then look for a GPU):
- the plugin wheel `jax-cuda12-pjrt` of the local jax version, fetched by pip into a cache dir
  (`--plugin` to give the .so instead);
- `ptxas` of a CUDA toolkit (`--cuda-root`, default /usr/local/cuda or the `ptxas` on PATH);
- a C compiler: the plugin asks the CUDA driver for the device's compute capability, so a stub
  `libcuda.so.1` answering 9.0 (and failing every other call) is built and preloaded;
- `nm`, to find the LLVM target initialisers the plugin runs when it starts a GPU client.

The numbers are a proxy for the device's: the local jax (0.10) lowers the kernels, the device's
jax (0.11) may lower them a little differently, and the toolkit's ptxas may differ in version.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / \
    "linear_jax_ptxas"

FAKE_CUDA = r"""
#include <string.h>
typedef int CUresult;
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12080; return 0; }
CUresult cuDeviceGet(int *d, int o) { *d = 0; return 0; }
CUresult cuDeviceGetCount(int *c) { *c = 1; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) {
  *v = attr == 75 ? 9 : attr == 76 ? 0 : attr == 16 ? 132 : 1;  /* CC 9.0, 132 SMs */
  return 0;
}
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "no GPU (stub)"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
"""

INIT = ("LLVMInitializeNVPTXTargetInfo", "LLVMInitializeNVPTXTarget",
        "LLVMInitializeNVPTXTargetMC", "LLVMInitializeNVPTXAsmPrinter")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="*", default=["decay", "delta", "gla", "selective",
                                                      "mlstm"])
    p.add_argument("--cases", nargs="*", type=int, default=[0],
                   help="indices into each family's lowering-test cases (default: the first)")
    p.add_argument("--grad", action="store_true", help="also the backward's kernels")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every case, e.g. --set gla_grad_key_blocks=True")
    p.add_argument("--json", default="", help="write the table here too")
    p.add_argument("--keep", default="", help="keep the PTX and pass logs in this directory")
    p.add_argument("--sass", action="store_true",
                   help="also the SASS instruction counts of each kernel and of its loops")
    p.add_argument("--plugin", default="", help="path of xla_cuda_plugin.so")
    p.add_argument("--cuda-root", default="")
    return p.parse_args(argv)


def plugin_path(given: str) -> str:
    if given:
        return given
    import jax
    found = glob.glob(str(CACHE / "pjrt" / "jax_plugins" / "xla_cuda12" / "xla_cuda_plugin.so"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(CACHE), f"jax-cuda12-pjrt=={jax.__version__}"], check=True)
    (wheel,) = glob.glob(str(CACHE / "jax_cuda12_pjrt-*.whl"))
    subprocess.run([sys.executable, "-m", "zipfile", "-e", wheel, str(CACHE / "pjrt")],
                   check=True)
    return str(CACHE / "pjrt" / "jax_plugins" / "xla_cuda12" / "xla_cuda_plugin.so")


def cuda_root(given: str) -> str:
    if given:
        return given
    for root in ("/usr/local/cuda",) + tuple(sorted(glob.glob("/usr/local/cuda-*"))[::-1]):
        if os.path.exists(os.path.join(root, "bin", "ptxas")):
            return root
    sys.exit("ptxas not found: pass --cuda-root (a CUDA toolkit with bin/ptxas)")


def cuobjdump_path() -> str:
    """cuobjdump and the nvdisasm it runs, from their wheels (one folder, so it finds it)."""
    tools = ("cuobjdump", "nvdisasm")
    found = [glob.glob(str(CACHE / "sass" / "nvidia" / "*" / "bin" / t)) for t in tools]
    if not all(found):
        wheels = CACHE / "sass_wheels"
        for t in tools:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            str(wheels), f"nvidia-cuda-{t}"], check=True)
            (wheel,) = glob.glob(str(wheels / f"nvidia_cuda_{t}-*.whl"))
            subprocess.run([sys.executable, "-m", "zipfile", "-e", wheel, str(CACHE / "sass")],
                           check=True)
        found = [glob.glob(str(CACHE / "sass" / "nvidia" / "*" / "bin" / t)) for t in tools]
    for (path,) in found:
        os.chmod(path, 0o755)
    os.environ["NVDISASM_PATH"] = os.path.dirname(found[1][0])
    return found[0][0]


SASS_LINE = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")


def sass_summary(ptx: pathlib.Path, root: str, top: int = 10) -> dict:
    """Static SASS counts of one kernel (its PTX assembled by the toolkit's ptxas for sm_90a):
    instructions, the `top` opcodes (mnemonic without modifiers), and per loop (the range of a
    backward branch before the last EXIT) the same."""
    cubin = ptx.with_suffix(".cubin")
    subprocess.run([os.path.join(root, "bin", "ptxas"), "-arch=sm_90a", "-o", str(cubin),
                    str(ptx)], check=True, capture_output=True)
    text = subprocess.run([cuobjdump_path(), "-sass", str(cubin)], check=True,
                          capture_output=True, text=True).stdout
    ins = []
    for line in text.splitlines():
        m = SASS_LINE.match(line)
        if m:
            words = m.group(2).split()
            op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
            ins.append((int(m.group(1), 16), op.split(".")[0], m.group(2)))

    def counts(lo, hi):
        c = collections.Counter(op for a, op, _ in ins if lo <= a <= hi)
        return {"instructions": sum(c.values()), "opcodes": dict(c.most_common(top))}

    # ptxas puts the retry paths of barrier waits after the last EXIT, branching back to
    # their wait: not loops
    end = max((a for a, op, _ in ins if op == "EXIT"), default=0)
    loops = []
    for a, op, t in ins:
        target = re.findall(r"0x[0-9a-f]+", t)
        if op == "BRA" and a < end and target and int(target[-1], 16) < a:
            lo = int(target[-1], 16)
            loops.append({"range": f"{lo:#x}-{a:#x}", **counts(lo, a)})
    return {**counts(0, ins[-1][0] if ins else 0), "loops": loops}


def stub_dir() -> str:
    out = CACHE / "stub"
    lib = out / "libcuda.so.1"
    if not lib.exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "stub.c").write_text(FAKE_CUDA)
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(out / "stub.c")],
                       check=True)
    return str(out)


def local_symbols(so: str, names) -> dict[str, int]:
    out = subprocess.run(["nm", so], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in names:
            table[parts[2]] = int(parts[0], 16)
    missing = set(names) - set(table)
    if missing:
        sys.exit(f"{so}: symbols not found: {sorted(missing)}")
    return table


def kernel_modules(mlir_text: str) -> list[bytes]:
    """The serialized Mosaic GPU modules of an exported program, in order."""
    from jax._src.lib.mlir import ir

    from tests.kernels.lowering import custom_call_payloads

    return custom_call_payloads(mlir_text, "module",
                                lambda bc: ir.StringAttr(bc["module"]).value_bytes)


def exports(families, cases, grad, over=None):
    """(label, case, exported mlir text) per family, case and direction; `over`: config fields
    set in every case (the chunk-family cases carry their overrides as the last element)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo's tests/
    from tests.kernels.lowering import hopper_exports

    table = hopper_exports()
    for fam in families:
        fn, all_cases = table[fam]
        for i in cases:
            if i >= len(all_cases) or all_cases[i][0] != "lane":
                continue
            case = all_cases[i]
            if over:
                if not isinstance(case[-1], dict):
                    sys.exit(f"--set: the {fam} cases take no config overrides")
                case = case[:-1] + ({**case[-1], **over},)
            for g in (False, True) if grad else (False,):
                label = f"{fam}[{i}] {'bwd' if g else 'fwd'}"
                yield label, case, fn(case, g).mlir_module()


REGS = re.compile(r"Used (\d+) registers")
STACK = re.compile(r"(\d+) bytes stack frame")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def read_report(text: str) -> dict:
    m, st, s = REGS.search(text), STACK.search(text), SPILL.search(text)
    warnings = sorted({w.strip() for w in re.findall(r"ptxas (?:warning|info) *: (.*)", text)
                       if "spilled" not in w and (w.startswith("(C") or "warning" in w
                                                  or "Potential" in w)})
    return {"registers": int(m.group(1)) if m else None,
            "stack": int(st.group(1)) if st else None,
            "spill_stores": int(s.group(1)) if s else 0,
            "spill_loads": int(s.group(2)) if s else 0,
            "warnings": warnings}


def main(argv=None) -> int:
    a = parse_args(argv)
    so, root = plugin_path(a.plugin), cuda_root(a.cuda_root)
    stub = stub_dir()
    if stub not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        # the plugin's CUDA stub opens libcuda.so.1 when it loads: the path must be set first
        env = dict(os.environ, LD_LIBRARY_PATH=stub + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
                   JAX_PLATFORMS="cpu")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    dump = pathlib.Path(a.keep or tempfile.mkdtemp(prefix="ptxas_report_"))
    dump.mkdir(parents=True, exist_ok=True)
    os.environ.update(MOSAIC_GPU_CUDA_ROOT=root, MOSAIC_GPU_DUMP_PTX="1",
                      MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=str(dump))

    dll = ctypes.CDLL(so)
    syms = local_symbols(so, INIT + ("MosaicGpuCompile",))
    base = ctypes.cast(dll.MosaicGpuCompile, ctypes.c_void_p).value - syms["MosaicGpuCompile"]
    for name in INIT:                  # what the plugin does when it starts a GPU client
        ctypes.CFUNCTYPE(None)(base + syms[name])()
    compile_fn = dll.MosaicGpuCompile
    compile_fn.argtypes = [ctypes.c_void_p, ctypes.c_int]
    compile_fn.restype = ctypes.c_void_p

    over = {}
    for item in a.set:
        key, _, value = item.partition("=")
        over[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit()
                                                       else value)
    rows = []
    for label, case, text in exports(a.families, a.cases, a.grad, over):
        for mod in kernel_modules(text):
            before = set(dump.glob("*.ptxas"))
            compile_fn(ctypes.c_char_p(mod), ctypes.c_int(len(mod)))  # fails at the GPU load
            new = sorted(set(dump.glob("*.ptxas")) - before)
            if not new:
                rows.append({"export": label, "kernel": "?", "error": "no ptxas report"})
                continue
            for path in new:
                kernel = re.sub(r"_\d+$", "", path.stem)
                rows.append({"export": label, "case": repr(case), "kernel": kernel,
                             **read_report(path.read_text())})
                if a.sass:
                    rows[-1]["sass"] = sass_summary(path.with_suffix(".ptx"), root)
    seen = set()
    print(f"{'export':<16} {'kernel':<34} {'regs':>4} {'spill st/ld (B)':>16} {'stack':>6}")
    for r in rows:
        key = (r["export"], r["kernel"])
        if key in seen:
            continue
        seen.add(key)
        if "error" in r:
            print(f"{r['export']:<16} {r['kernel']:<34} {r['error']}")
            continue
        print(f"{r['export']:<16} {r['kernel']:<34} {r['registers']:>4} "
              f"{r['spill_stores']:>7} / {r['spill_loads']:<6} {r['stack']:>6}"
              + ("  " + "; ".join(w[:60] for w in r["warnings"]) if r["warnings"] else ""))
        if "sass" in r:
            fmt = lambda c: ", ".join(f"{k} {v}" for k, v in c["opcodes"].items())  # noqa: E731
            print(f"{'':<17}sass: {r['sass']['instructions']} instructions")
            for lp in r["sass"]["loops"]:
                print(f"{'':<17}loop {lp['range']}: {lp['instructions']} ({fmt(lp)})")
    if a.json:
        import datetime

        import jax
        ptxas = subprocess.run([os.path.join(root, "bin", "ptxas"), "--version"],
                               capture_output=True, text=True).stdout.strip().splitlines()
        meta = {"what": "ptxas -v of each Mosaic GPU kernel, compiled on a CPU host by "
                        "tools/ptxas_report.py (a proxy for the device's compiler)",
                "jax": jax.__version__, "plugin": os.path.basename(os.path.dirname(so)),
                "ptxas": ptxas[-1] if ptxas else "?", "target": "sm_90a",
                "date": datetime.date.today().isoformat(), "argv": sys.argv[1:],
                "commit": subprocess.run(["git", "describe", "--always", "--dirty"],
                                         capture_output=True, text=True).stdout.strip()}
        pathlib.Path(a.json).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
