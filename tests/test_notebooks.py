"""The notebooks: the committed files show their outputs (every code cell executed, every cell
tagged "plot" with its image, the images small), and each runs top to bottom on CPU at the CI
sizes (LINEAR_JAX_QUICK=1) from cleared outputs, every "plot" cell rendering an image. The runs
are smoke tests, under a minute or two each; tools/execute_notebooks.py regenerates the files."""

from __future__ import annotations

import base64
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))
import execute_notebooks  # noqa: E402


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_shows_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert execute_notebooks.problems(nb) == []
    assert "colab" in nb.cells[0].source.lower() and "cpu" in nb.cells[0].source.lower(), \
        "the first cell says how long the notebook runs on a free Colab CPU"
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                assert len(base64.b64decode(png)) < 120_000, "a committed image is too large"
    assert not any("execution" in c.metadata for c in nb.cells), "volatile metadata committed"


@pytest.mark.smoke
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(path):
    nb, _ = execute_notebooks.execute(path, quick=True, timeout=600)
    plot_cells = [c for c in nb.cells if "plot" in c.get("metadata", {}).get("tags", [])]
    assert plot_cells, "a notebook shows at least one plot"
    for cell in plot_cells:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"plot cell rendered no image:\n{cell.source[:200]}"
