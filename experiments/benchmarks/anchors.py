"""The peer libraries' timings on the machine at hand, merged into one anchors file.

    PROBE_T=2048,8192,32768 python3 benchmarks/anchors/probe_jla.py        # writes $OUT/jla.json
    PROBE_T=2048,8192,32768 python3 benchmarks/anchors/probe_fla_torch.py  # writes $OUT/torch.json
    python -m experiments.benchmarks.anchors $OUT/jla.json $OUT/torch.json

The probes (copied unchanged from the project's shared anchors) time flash-linear-attention through
torch and jax-linear-attention's Mosaic GPU kernels at the anchor shapes; this script merges their
rows by T into `benchmarks/anchors/<device>-anchors.json`, the layout of `h100-anchors.json`, which
`ops_gpu` then reads for the device it runs on (`anchors_for`). Numbers are copied, never edited.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys

DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "anchors")


def slug(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA H200' -> 'h200'; else the lowered name."""
    m = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", device_kind)
    return (m.group(1) if m else device_kind.replace(" ", "_")).lower()


def anchors_for(device_kind: str) -> tuple[str, dict]:
    """(path, {T: row}) of the anchors measured on this device kind, else the H100 ones."""
    path = os.path.join(DIR, f"{slug(device_kind)}-anchors.json")
    if not os.path.exists(path):
        path = os.path.join(DIR, "h100-anchors.json")
    return os.path.normpath(path), {r["T"]: r for r in json.load(open(path))["rows"]}


def merge(paths: list[str]) -> dict:
    rows: dict[int, dict] = {}
    versions: dict[str, str] = {}
    device = None
    for p in paths:
        for r in json.load(open(p)):
            T = r.get("T") or r.get("shape", {}).get("T")
            B = r.get("B") or r.get("shape", {}).get("B")
            row = rows.setdefault(T, {"T": T, "B": B})
            for k, v in r.items():
                if k in ("torch", "triton"):
                    versions[k] = v
                elif k == "gpu":
                    device = v
                elif "." in k:
                    row[k] = v
    return {"device": device, "rows": [rows[T] for T in sorted(rows)], "versions": versions}


def main(argv=None) -> int:
    import jax

    paths = (argv if argv is not None else sys.argv[1:])
    m = merge(paths)
    kind = jax.devices()[0].device_kind
    versions = {**m["versions"], "flash-linear-attention": "0.6.0", "jax": jax.__version__,
                "jax-linear-attention": "0.1.0"}
    out = {"device": kind, "date": datetime.date.today().isoformat(), "dtype": "bfloat16",
           "H": 16, "K": 128, "V": 128, "tokens_per_batch": 16384,
           "note": "median ms, measured by benchmarks/anchors/probe_*.py on this device; "
                   "fwdbwd = forward + backward of sum(o * do) w.r.t. q, k, v.",
           "versions": versions, "rows": m["rows"]}
    dest = os.environ.get("OUT") or DIR
    path = os.path.join(dest, f"{slug(kind)}-anchors.json")
    if os.path.exists(path):            # keep what these probes do not measure (e.g. "scans")
        old = json.load(open(path))
        out.update({k: v for k, v in old.items() if k not in out})
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    for r in out["rows"]:
        print(r["T"], {k: round(v, 3) for k, v in r.items() if k.endswith("_ms")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
