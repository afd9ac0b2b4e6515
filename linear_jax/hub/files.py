"""A checkpoint directory on disk: `config.json` and safetensors files, one or sharded through
`model.safetensors.index.json`.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw little-endian bytes. Headers are read first and alone,
so a checkpoint is checked whole before any tensor is; a tensor is then a read-only memory map of
its bytes, read from disk when the caller copies it (to a device). The format is read here rather
than through the `safetensors` package because its numpy reader has no bfloat16; writing goes
through `safetensors.numpy`, which stores `ml_dtypes.bfloat16` arrays as BF16.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype name (`F32`, `BF16`, ...), shape and byte range."""
    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_config(directory) -> dict:
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json (a transformers checkpoint directory "
                         f"holds config.json and model.safetensors or its index)")
    return json.loads(path.read_text())


def _header(file: pathlib.Path) -> dict[str, Entry]:
    if not file.is_file():
        raise ValueError(f"{file}: no such checkpoint file")
    size = file.stat().st_size
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ValueError(f"{file}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        start, end = h["data_offsets"]
        if base + end > size:
            raise ValueError(f"{file}: tensor {name!r} runs past the end of the file")
        out[name] = Entry(file, h["dtype"], tuple(h["shape"]), base + start, base + end)
    return out


def entries(directory) -> dict[str, Entry]:
    """Every tensor of the checkpoint by name, from the headers alone."""
    d = pathlib.Path(directory)
    if (d / INDEX).is_file():
        weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        out = {}
        for file in sorted(set(weight_map.values())):
            if not (d / file).is_file():
                names = sorted(n for n, f in weight_map.items() if f == file)
                raise ValueError(f"{d / INDEX}: shard {file} (tensors {names[:5]}) is absent")
            for name, e in _header(d / file).items():
                if weight_map.get(name) != file:
                    raise ValueError(f"{d / file}: tensor {name!r} is not listed for this file in "
                                     f"{INDEX}")
                out[name] = e
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{d / INDEX} lists tensors no shard holds: {missing}")
        return out
    if (d / SINGLE).is_file():
        return _header(d / SINGLE)
    raise ValueError(f"{d}: neither {SINGLE} nor {INDEX}")


def array(entry: Entry) -> np.ndarray:
    """The tensor as a read-only memory map (nothing is read until it is used)."""
    if entry.dtype not in DTYPES:
        raise ValueError(f"{entry.file}: unknown safetensors dtype {entry.dtype}")
    return np.memmap(entry.file, DTYPES[entry.dtype], "r", entry.start, entry.shape or (1,)
                     ).reshape(entry.shape)


def write(directory, config: dict, tensors: dict[str, np.ndarray], max_shard_bytes=None):
    """config.json and the tensors, in one file or, past `max_shard_bytes`, in shards with an
    index (transformers' names: model-0000i-of-0000n.safetensors)."""
    from safetensors.numpy import save_file

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards, size = [{}], 0
    for name, t in tensors.items():
        if max_shard_bytes and shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(t)
        size += t.nbytes
    meta = {"format": "pt"}        # what transformers checks before it reads a file
    if len(shards) == 1:
        save_file(shards[0], str(d / SINGLE), metadata=meta)
        return
    n, weight_map = len(shards), {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(d / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for t in tensors.values())
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                       "weight_map": weight_map}, indent=2) + "\n")
