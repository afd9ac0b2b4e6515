"""Executes the notebooks in place at their CPU sizes, so that the repository shows their outputs.

    python tools/execute_notebooks.py [notebooks/03_mqar.ipynb ...] [--quick] [--check]

Each notebook runs top to bottom in a fresh kernel on the CPU (JAX_PLATFORMS=cpu), from the
notebook's folder, with figures rendered as small PNGs (60 dpi, cut to their content) so that the
committed files stay a few hundred kilobytes. What changes from one run to the next without the
notebook changing (execution timestamps, the kernel's Python patch version, widget state) is
dropped, so a re-run's diff shows only outputs that moved. `--quick` runs the CI sizes
(LINEAR_JAX_QUICK=1) and writes nothing; `--check` fails when a committed notebook has a code cell
never executed or a "plot" cell without an image (tests/test_notebooks.py checks the same).
The seconds each notebook took are printed: the first cell of each quotes them.
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DPI = 60
# run in the kernel before the notebook's first cell, then removed from the saved notebook
PREAMBLE = (f"%config InlineBackend.figure_formats = ['png']\n"
            f"%config InlineBackend.rc = {{'figure.dpi': {DPI}}}\n"
            f"%config InlineBackend.print_figure_kwargs = {{'bbox_inches': 'tight', "
            f"'dpi': {DPI}}}")
KEEP_METADATA = ("accelerator", "colab", "kernelspec")


def clean(nb) -> None:
    """Drops what a re-run changes by itself."""
    nb.metadata = {k: nb.metadata[k] for k in KEEP_METADATA if k in nb.metadata} | {
        "language_info": {"name": "python"}}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("widgets", None)
        for out in cell.get("outputs", []):
            out.get("metadata", {}).pop("execution", None)


def execute(path: pathlib.Path, *, quick: bool, timeout: int = 1800):
    """The executed notebook (a copy; the file is not touched) and the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    run = copy.deepcopy(nb)
    run.cells.insert(0, nbformat.v4.new_code_cell(PREAMBLE))
    env = {"JAX_PLATFORMS": "cpu", "LINEAR_JAX_QUICK": "1" if quick else "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)              # the kernel inherits this process's environment
    try:
        t0 = time.perf_counter()
        NotebookClient(run, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    run.cells.pop(0)
    for cell in run.cells:              # execution counts from 1, as if the preamble were not
        if cell.cell_type == "code" and cell.execution_count is not None:
            cell.execution_count -= 1
            for out in cell.outputs:
                if "execution_count" in out:
                    out["execution_count"] -= 1
    clean(run)
    return run, seconds


def problems(nb) -> list[str]:
    """What makes a committed notebook look unexecuted."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.execution_count is None:
            out.append(f"cell {i} was not executed")
        if "plot" in cell.metadata.get("tags", []) and not any(
                "image/png" in o.get("data", {}) for o in cell.outputs):
            out.append(f"plot cell {i} has no image")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=pathlib.Path, default=NOTEBOOKS)
    p.add_argument("--quick", action="store_true", help="CI sizes, nothing written")
    p.add_argument("--check", action="store_true", help="check the committed notebooks only")
    a = p.parse_args(argv)
    bad = 0
    for path in a.paths:
        if a.check:
            found = problems(nbformat.read(path, as_version=4))
            bad += bool(found)
            print(f"{path.name}: {'; '.join(found) or 'ok'}")
            continue
        nb, seconds = execute(path, quick=a.quick)
        print(f"{path.name}: {seconds:.0f} s", flush=True)
        if not a.quick:
            nbformat.write(nb, path)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
