"""Every notebook runs top to bottom on CPU (small sizes: LINEAR_JAX_QUICK=1) without a cell error,
and every cell tagged "plot" renders at least one image. Smoke tests: one to two minutes each."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.smoke

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(path, monkeypatch):
    monkeypatch.setenv("LINEAR_JAX_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "outputs must be stripped in the repository"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    plot_cells = [c for c in nb.cells if "plot" in c.get("metadata", {}).get("tags", [])]
    assert plot_cells, "a notebook shows at least one plot"
    for cell in plot_cells:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"plot cell rendered no image:\n{cell.source[:200]}"
