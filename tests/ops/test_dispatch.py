"""`impl="auto"` picks per platform, explicit impls are honoured or refused."""

from __future__ import annotations

import pytest

from linear_jax.ops import _dispatch

CHUNK_FAMILY = {"recurrent": 1, "chunk": 2, "pallas": 3}
NO_KERNEL = {"recurrent": 1, "chunk": 2}


@pytest.mark.parametrize(
    "backend,op,available,T,expected",
    [
        ("gpu", "gla", CHUNK_FAMILY, 1024, "pallas"),
        ("cuda", "gla", CHUNK_FAMILY, 1024, "pallas"),
        ("tpu", "simple_gla", CHUNK_FAMILY, 1024, "pallas"),
        ("cpu", "gla", CHUNK_FAMILY, 1024, "chunk"),          # interpret mode is for tests only
        ("gpu", "mlstm", NO_KERNEL, 1024, "chunk"),
        ("cpu", "hgrn", NO_KERNEL, 1024, "recurrent"),         # element-wise scans on a CPU
        ("gpu", "hgrn", NO_KERNEL, 1024, "chunk"),
        ("gpu", "selective_scan", CHUNK_FAMILY, 1024, "pallas"),   # checked on the device
        ("gpu", "hgrn", CHUNK_FAMILY, 1024, "pallas"),
        ("gpu", "mlstm", CHUNK_FAMILY, 1024, "pallas"),            # checked on the device
        ("gpu", "gla", CHUNK_FAMILY, 1, "recurrent"),          # one decoding step
        ("cpu", "delta_rule", NO_KERNEL, 1, "recurrent"),
    ],
)
def test_auto_choice_per_platform(monkeypatch, backend, op, available, T, expected):
    monkeypatch.setattr(_dispatch, "platform", lambda: backend)
    assert _dispatch.resolve(op, "auto", T, available) == expected


def test_explicit_impls_are_honoured_or_refused(monkeypatch):
    monkeypatch.setattr(_dispatch, "platform", lambda: "gpu")
    assert _dispatch.resolve("gla", "chunk", 1, CHUNK_FAMILY) == "chunk"
    with pytest.raises(ValueError, match="not implemented for this op"):
        _dispatch.resolve("mlstm", "pallas", 10, NO_KERNEL)
    with pytest.raises(ValueError, match="impl must be one of"):
        _dispatch.resolve("gla", "triton", 10, CHUNK_FAMILY)


def test_auto_skips_kernels_not_yet_checked_on_a_device(monkeypatch):
    """A kernel listed as unchecked is reachable with impl="pallas" but not chosen by "auto"."""
    monkeypatch.setattr(_dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(_dispatch, "_UNCHECKED_ON_DEVICE", ("mlstm",))
    assert _dispatch.resolve("mlstm", "auto", 1024, CHUNK_FAMILY) == "chunk"
    assert _dispatch.resolve("mlstm", "pallas", 1024, CHUNK_FAMILY) == "pallas"
    assert _dispatch.resolve("gla", "auto", 1024, CHUNK_FAMILY) == "pallas"
