"""Backend registry and the ``auto`` rule.

A backend is a module exposing the private backend interface documented in
:mod:`fastdecode.ops.torch_backend` (``append_kv``, ``paged_attention``, ``process_logits``,
``sample``, ``apply_repetition_penalty``; a backend may cover a subset, see ``_COVERAGE``).
Public ops validate and normalise their arguments, then call the backend chosen here. A choice
is made once per (backend, op, device, head_dim) and cached: an op call costs a dict lookup.

``auto`` on CUDA tensors trusts the GPU validation record, ``fastdecode/gpu_validation.json``:
written by ``scripts/gpu_run.sh`` from a passing run on real hardware and committed with its
results, it lists, per device family (``sm_90`` covers H100 and H200), the ops whose tests
passed for each GPU backend.
"""

from __future__ import annotations

import importlib
import json
import os
from functools import lru_cache
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
# "paged_prefill" is paged_attention's packed form (cu_seqlens_q given); "paged_relative_bias"
# its decode form with a relative_bias table.
_ALL_OPS = {"append_kv", "paged_attention", "paged_prefill", "paged_relative_bias",
            "process_logits", "sample", "apply_repetition_penalty", "contrastive_logits"}
_OP_WORDS = {"paged_prefill": "packed (prefill) paged_attention",
             "paged_relative_bias": "paged_attention with relative_bias"}
_COVERAGE = {
    "torch": _ALL_OPS,
    "cpu": _ALL_OPS,
    "triton": _ALL_OPS,
    "cuda": {"append_kv", "paged_attention", "sample", "contrastive_logits"},
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


VALIDATION_RECORD = Path(__file__).resolve().parent.parent / "gpu_validation.json"
_RESOLVED: dict[tuple, ModuleType] = {}


@lru_cache(maxsize=None)
def validation_record() -> dict:
    """{device family: {"passed": {backend: [ops]}, ...}} from the committed GPU validation
    record; {} when there is none (or it cannot be read)."""
    try:
        record = json.loads(VALIDATION_RECORD.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def device_family(device: torch.device) -> str:
    """The validation record's key for a CUDA device: ``sm_<major><minor>``."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# Among the GPU backends validated for an op, ``auto`` takes the faster one as measured on an H100
# (benchmarks/results/attention_gpu.md, sampling_gpu.md): CUDA's sampler runs 4-7x Triton's at
# batch >= 64, while Triton's decode attention runs 1.2-2x the CUDA kernel's speed.
_GPU_PREFERENCE = {"paged_attention": ("triton", "cuda")}
_GPU_DEFAULT_ORDER = ("cuda", "triton")


def validated_backends(op: str, device: torch.device) -> list[str]:
    """The GPU backends whose tests of ``op`` passed on ``device``'s family, the faster first
    (``_GPU_PREFERENCE``). ``FASTDECODE_AUTO_CUDA=1`` trusts the CUDA backend without a record
    and puts it first, ``=0`` never picks it."""
    env = os.environ.get("FASTDECODE_AUTO_CUDA")
    if env is not None:
        return ["cuda"] if env == "1" else []
    passed = validation_record().get(device_family(device), {}).get("passed", {})
    order = _GPU_PREFERENCE.get(op, _GPU_DEFAULT_ORDER)
    return [name for name in order if op in passed.get(name, ())]


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
    the backends validated for ``op`` on the device's family (the faster first), else
    ``triton`` (``torch`` if Triton is missing). An explicit backend that cannot run raises
    :class:`BackendUnavailableError`. Resolved once per argument set (and environment), then
    cached.
    """
    key = (backend, op, device.type, device.index, head_dim,
           os.environ.get("FASTDECODE_AUTO_CUDA"), _interpreting())
    module = _RESOLVED.get(key)
    if module is None:
        module = _RESOLVED[key] = _resolve(backend, op, device, head_dim)
    return module


def _resolve(backend: str, op: str, device: torch.device, head_dim: int | None) -> ModuleType:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            order = list(dict.fromkeys(validated_backends(op, device) + ["triton", "torch"]))
        else:
            order = ["cpu", "torch"]
        for name in order:
            if _covers(name, op, head_dim):
                return _load(name)
        return _load("torch")
    if op not in _COVERAGE[backend]:
        what = _OP_WORDS.get(op, op)
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
