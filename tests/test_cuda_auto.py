"""backend="auto" on CUDA tensors: per op, the GPU backend whose tests passed on the device's
family (the committed GPU validation record), the faster of the two where both passed,
Triton when nothing is recorded; resolved once, then a dict lookup. Runs without a GPU (the device queries are faked)."""

from __future__ import annotations

import json

import pytest
import torch

from fastdecode.ops import _backends

RECORD = {"sm_90": {"passed": {"cuda": ["append_kv", "sample"],
                               "triton": ["sample", "paged_attention", "paged_prefill"]}}}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every backend available (as named stand-ins), a device family chosen by the test, and a
    fresh resolution cache; returns a setter of the family."""
    monkeypatch.delenv("FASTDECODE_AUTO_CUDA", raising=False)
    monkeypatch.setattr(_backends, "is_available", lambda name: True)
    monkeypatch.setattr(_backends, "_load", lambda name: type("M", (), {"name": name})())
    monkeypatch.setattr(_backends, "validation_record", lambda: RECORD)
    monkeypatch.setattr(_backends, "_RESOLVED", {})
    family = {"value": "sm_90"}
    monkeypatch.setattr(_backends, "device_family", lambda device: family["value"])
    return lambda value: family.update(value=value)


def _auto(op: str, index: int = 0) -> str:
    return _backends.resolve("auto", op, torch.device("cuda", index)).name


def test_auto_follows_the_record_per_op(fake_gpu):
    assert _auto("append_kv") == "cuda"
    assert _auto("sample") == "cuda"
    assert _auto("paged_attention") == "triton"  # CUDA's decode kernel not validated here
    assert _auto("process_logits") == "triton"  # nothing validated: Triton
    fake_gpu("sm_80")  # another family: its own record (none), on another device
    assert _auto("append_kv", index=1) == "triton"


def test_auto_is_resolved_once(fake_gpu, monkeypatch):
    calls = []
    resolve = _backends._resolve
    monkeypatch.setattr(_backends, "_resolve", lambda *a: calls.append(a) or resolve(*a))
    first = _backends.resolve("auto", "sample", torch.device("cuda", 0))
    for _ in range(5):
        assert _backends.resolve("auto", "sample", torch.device("cuda", 0)) is first
    assert len(calls) == 1


def test_auto_takes_the_faster_of_two_validated_backends(fake_gpu, monkeypatch):
    both = {"sm_90": {"passed": {name: ["paged_attention", "sample"]
                                 for name in ("cuda", "triton")}}}
    monkeypatch.setattr(_backends, "validation_record", lambda: both)
    assert _auto("paged_attention") == "triton"  # Triton's decode kernel is the faster
    assert _auto("sample") == "cuda"  # CUDA's sampler is the faster
    assert _backends.validated_backends("paged_attention", torch.device("cuda")) == [
        "triton", "cuda"]


def test_validation_record_is_read_from_the_package(tmp_path, monkeypatch):
    path = tmp_path / "gpu_validation.json"
    path.write_text(json.dumps(RECORD))
    monkeypatch.setattr(_backends, "VALIDATION_RECORD", path)
    _backends.validation_record.cache_clear()
    try:
        assert _backends.validation_record() == RECORD
        path.write_text("not json")
        _backends.validation_record.cache_clear()
        assert _backends.validation_record() == {}
    finally:
        _backends.validation_record.cache_clear()
