"""Backend registry and the ``auto`` rule.

A backend is a module exposing the private backend interface documented in
:mod:`fastdecode.ops.torch_backend` (``append_kv``, ``paged_attention``, ``process_logits``,
``sample``, ``apply_repetition_penalty``; a backend may cover a subset, see ``_COVERAGE``). Public ops validate and normalise
their arguments, then call the backend chosen here.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

_MODULES = {
    "torch": "fastdecode.ops.torch_backend",
    "cpu": "fastdecode.ops.cpu_backend",
    "triton": "fastdecode.triton",
    "cuda": "fastdecode.ops.cuda_backend",
}

# Ops each backend implements; anything else raises for an explicit request.
# "paged_prefill" is paged_attention's packed form (cu_seqlens_q given).
_ALL_OPS = {"append_kv", "paged_attention", "paged_prefill", "process_logits", "sample",
            "apply_repetition_penalty"}
_COVERAGE = {
    "torch": _ALL_OPS,
    "cpu": _ALL_OPS,
    "triton": _ALL_OPS,
    "cuda": {"append_kv", "paged_attention", "sample"},
}


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run the call."""


_LOADED: dict[str, ModuleType | Exception] = {}


def _load(name: str) -> ModuleType | Exception:
    """Import backend ``name`` once; an import failure is kept and reported when requested."""
    if name not in _LOADED:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = getattr(module, "unavailable_reason", lambda: None)()
            _LOADED[name] = RuntimeError(reason) if reason else module
        except Exception as exc:  # ImportError, or a broken build
            _LOADED[name] = exc
    return _LOADED[name]


def is_available(name: str) -> bool:
    """Whether backend ``name`` ("torch", "cpu", "triton", "cuda") can run here."""
    return not isinstance(_load(name), Exception)


def available_backends() -> list[str]:
    """The backends that can run on this machine, in the order ``auto`` prefers them."""
    return [name for name in ("cuda", "triton", "cpu", "torch") if is_available(name)]


def cuda_backend_validated() -> bool:
    """True once the CUDA backend's GPU tests have passed on real hardware.

    The evidence is ``fastdecode/cuda_validated.json``, written by the GPU script from a passing
    run (and committed with its log under ``benchmarks/results/``); ``FASTDECODE_AUTO_CUDA=0/1``
    overrides it.
    """
    env = os.environ.get("FASTDECODE_AUTO_CUDA")
    if env is not None:
        return env == "1"
    marker = Path(__file__).resolve().parent.parent / "cuda_validated.json"
    try:
        return bool(json.loads(marker.read_text()).get("passed"))
    except (OSError, ValueError):
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _covers(name: str, op: str, head_dim: int | None) -> bool:
    if op not in _COVERAGE[name] or not is_available(name):
        return False
    dims = getattr(_load(name), "SUPPORTED_HEAD_DIMS", None)
    return head_dim is None or dims is None or head_dim in dims


def resolve(backend: str, op: str, device: torch.device,
            head_dim: int | None = None) -> ModuleType:
    """Return the backend module that runs ``op`` on tensors of ``device``.

    ``auto``: CPU tensors -> ``cpu`` (``torch`` if the extension is not built); CUDA tensors ->
    ``cuda`` once validated on hardware and covering ``op``, else ``triton`` (``torch`` if Triton
    is missing). An explicit backend that cannot run raises :class:`BackendUnavailableError`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            order = (["cuda"] if cuda_backend_validated() else []) + ["triton", "torch"]
        else:
            order = ["cpu", "torch"]
        for name in order:
            if _covers(name, op, head_dim):
                return _load(name)
        return _load("torch")
    if op not in _COVERAGE[backend]:
        what = "packed (prefill) paged_attention" if op == "paged_prefill" else op
        raise BackendUnavailableError(
            f"backend={backend!r} does not implement {what}; use backend='triton' or 'auto'"
        )
    _check_device(backend, device)
    module = _load(backend)
    if isinstance(module, Exception):
        raise BackendUnavailableError(f"backend={backend!r} is not available: {module}")
    return module


def _check_device(backend: str, device: torch.device) -> None:
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend='cpu' needs CPU tensors, got {device}")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend='cuda' needs CUDA tensors, got {device}")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise BackendUnavailableError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for {device} tensors"
        )
