import os

import pytest

from tests.utils import FAST_COMPILE_XLA_FLAGS

# Tests run on CPU; 8 host devices let the sharding tests build meshes (subsets of them), and XLA
# compiles for speed, not for fast code (`FAST_COMPILE_XLA_FLAGS`: compiling dominates the suite).
# (linear_jax adds its own XLA CPU workaround flag on import: linear_jax/_compat.py.)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   + FAST_COMPILE_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Orders the run for a parallel session on few cores (pytest-xdist hands each worker
    consecutive items):
    - tests marked `smoke` first: each runs for minutes, and started last they would be the tail
      of the run with one core idle;
    - in a module that sets `GROUP_BY = "<parameter>"` (tests/ops/test_contract.py: its cases),
      the tests with the same value of that parameter together, at the place of the first: they
      share jitted functions, whose compilation is most of their cost.
    Otherwise the collection order stands."""
    def group_of(n, item):
        param = getattr(getattr(item, "module", None), "GROUP_BY", None)
        callspec = getattr(item, "callspec", None)
        if param is None or callspec is None or param not in callspec.params:
            return n
        return item.path, callspec.params[param]

    first = {}
    for n, item in enumerate(items):
        first.setdefault(group_of(n, item), n)

    def key(pair):
        n, item = pair
        return item.get_closest_marker("smoke") is None, first[group_of(n, item)], n

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]
