"""Shared fixtures: every op test body runs on every backend.

Without a GPU, Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set here, before
anything imports triton); the CUDA backend's tests skip. ``FASTDECODE_REQUIRE_EXT=1`` (set by CI)
turns a missing C++ extension into a failure instead of a skip.
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A shared op test run on a backend that does not implement the op (the CUDA backend covers
    decode attention, append_kv and sample only) is reported as skipped, with the reason."""
    outcome = yield
    exc = call.excinfo
    if (call.when == "call" and exc is not None
            and exc.errisinstance(_backends.BackendUnavailableError)
            and "does not implement" in str(exc.value)):
        report = outcome.get_result()
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {exc.value}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
