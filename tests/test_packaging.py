"""The distribution ships every source package, and kernels/ only as linear_jax.kernels."""

from __future__ import annotations

import pathlib

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _source_packages():
    found = set()
    for top, name in (("linear_jax", "linear_jax"), ("kernels", "linear_jax.kernels")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_source_package_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["linear_jax.kernels"] == "kernels"
    assert set(cfg["packages"]) == _source_packages()
    assert not any(p == "kernels" or p.startswith("kernels.") for p in cfg["packages"])
