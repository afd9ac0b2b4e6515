"""Import an older commit's `kernels/` tree beside the current one, for side-by-side timings.

    mods = load("7c716e1")            # {"decay": module, "delta": module, ...} of that commit
    python -m experiments.benchmarks.old_kernels 7c716e1 658a80f     # prepare, on the host

The tree is read from `runs/trees/<commit>/kernels` when that folder exists (made on the host by
`prepare`, i.e. `git archive <commit> kernels | tar -x -C runs/trees/<commit>`; runs/ is
git-ignored, so the device run tool takes it along only when `carry` names it), else extracted at
run time with `git archive` (this needs the repository's .git beside the working tree). It is
imported as `linear_jax.kernels` with the current package set aside in `sys.modules`, which is put
back afterwards; the old modules keep their own globals, so both can be called in one process. No
old code is committed. The old tree imports `linear_jax.ops.common.chunking` (`doc_index`,
`pad_time`) and `linear_jax._compat`, which the current tree still provides.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import types

PREFIX = "linear_jax.kernels"
REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TREES = os.path.join(REPO, "runs", "trees")


def prepare(*commits, trees: str = TREES):
    """Extract each commit's kernels/ under trees/<commit> (on the host, before a device run)."""
    for c in commits:
        extract(c, os.path.join(trees, c))


def extract(commit: str, root: str | None = None) -> str:
    """`kernels/` of `commit` under a fresh folder (or `root`); returns the folder."""
    root = root or tempfile.mkdtemp(prefix=f"kernels_{commit}_")
    os.makedirs(root, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit, "kernels"], capture_output=True,
                             check=True, cwd=REPO).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    return root


def load(commit: str, names=("decay", "delta"), trees: str = TREES) -> dict:
    """The modules `kernels.gpu.<name>` of `commit`, imported under their own package."""
    root = os.path.join(trees, commit)
    if not os.path.isdir(os.path.join(root, "kernels")):
        root = extract(commit)
    import linear_jax
    saved = {k: m for k, m in sys.modules.items() if k == PREFIX or k.startswith(PREFIX + ".")}
    saved_attr = getattr(linear_jax, "kernels", None)
    for k in saved:
        del sys.modules[k]
    try:
        pkg = types.ModuleType(PREFIX)
        pkg.__path__ = [os.path.join(root, "kernels")]
        sys.modules[PREFIX] = pkg
        mods = {n: importlib.import_module(f"{PREFIX}.gpu.{n}") for n in names}
        mods["_compat"] = sys.modules.get(f"{PREFIX}._compat")
    finally:
        for k in [k for k in sys.modules if k == PREFIX or k.startswith(PREFIX + ".")]:
            del sys.modules[k]
        sys.modules.update(saved)
        if saved_attr is not None:
            linear_jax.kernels = saved_attr
    return mods


if __name__ == "__main__":
    prepare(*sys.argv[1:])


@contextlib.contextmanager
def lowered_for_gpu(mods):
    """The old tree's switch that traces its kernels for the Triton lowering on a CPU host (it had
    no config field for it)."""
    compat = mods.get("_compat")
    ctx = getattr(compat, "lower_for_gpu", None)
    with (ctx() if ctx else contextlib.nullcontext()):
        yield
