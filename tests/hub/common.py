"""Shared by the hub tests: the fixtures (tools/make_hub_fixtures.py) and copies to mutate."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from linear_jax.hub import files

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hub"
FAMILIES = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def golden(family: str) -> dict:
    return dict(np.load(ROOT / family / "golden.npz"))


def tensors(directory) -> dict[str, np.ndarray]:
    return {n: np.array(files.array(e)) for n, e in files.entries(directory).items()}


def copy(family: str, dest: pathlib.Path, *, config=None, tensors_=None) -> pathlib.Path:
    """The fixture `family` at `dest`, with config.json and/or the tensors replaced (the
    tensors then go into one file, dropping the index)."""
    shutil.copytree(ROOT / family, dest)
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config))
    if tensors_ is not None:
        for f in dest.glob("*.safetensors*"):
            f.unlink()
        files.write(dest, json.loads((dest / "config.json").read_text()), tensors_)
    return dest


def config(family: str) -> dict:
    return json.loads((ROOT / family / "config.json").read_text())
