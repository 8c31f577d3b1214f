"""Shared fixtures: every op test body runs on every backend that implements its ops.

Without a GPU, Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set here, before
anything imports triton); the CUDA backend's tests skip. ``FASTDECODE_REQUIRE_EXT=1`` (set by CI)
turns a missing C++ extension into a failure instead of a skip.

A test that exercises an op some backend does not implement (the CUDA backend covers decode
attention, append_kv and sample) says so with ``@pytest.mark.ops("process_logits", ...)``; its
instances for such a backend are deselected at collection, so a GPU run never counts them as
skipped and a backend that stops implementing an op fails loudly. A test mixing covered and
uncovered ops checks ``backend.covers(op)`` around the uncovered part instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastdecode.ops import _backends  # noqa: E402


@dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device
    interpreted: bool  # Triton on CPU: slow, so tests shrink sizes (never drop a case)

    def __str__(self) -> str:
        return self.name

    def covers(self, op: str) -> bool:
        """Whether this backend implements ``op`` ("paged_prefill": the packed form)."""
        return op in _backends._COVERAGE[self.name]


def _make(name: str) -> Backend:
    if name in ("torch", "cpu"):
        device = torch.device("cpu")
    elif name == "cuda" or HAS_GPU:
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    return Backend(name, device, name == "triton" and device.type == "cpu")


def _skip_reason(name: str) -> str | None:
    if name == "cuda" and not HAS_GPU:
        return "needs a CUDA GPU"
    if not _backends.is_available(name):
        reason = f"backend {name} unavailable: {_backends._load(name)}"
        if name == "cpu" and os.environ.get("FASTDECODE_REQUIRE_EXT") == "1":
            pytest.fail(reason)
        return reason
    return None


@pytest.fixture(params=["torch", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request) -> Backend:
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return _make(request.param)


def pytest_configure(config):
    config.addinivalue_line("markers", "ops(*names): ops the test exercises; its instances for "
                            "a backend that does not implement one of them are deselected")


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("ops")
        name = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        uncovered = (marker is not None and name is not None
                     and not set(marker.args) <= _backends._COVERAGE[name])
        (drop if uncovered else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models: thread synchronisation costs more than the math (many times slower on a busy
    machine), so tests that run many of their steps use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
