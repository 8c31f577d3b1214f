"""The argument-check vocabulary of the public ops, and the debug switch.

Two kinds of checks:

- *metadata* checks (shapes, dtypes, devices, Python numbers) cost no device work and always run;
- *value* checks (ids in range, monotonic ``cu_seqlens_q``, finite slopes) read tensor contents.
  They run on the host for CPU tensors. For CUDA tensors they would need a device-to-host copy
  (a sync on every call), so by default the kernels' device-side guards stand in for them; the
  debug mode runs them for CUDA tensors too.

Debug mode: ``FASTDECODE_DEBUG_CHECKS=1`` in the environment (read at import) or
``fastdecode.ops.set_debug_checks(True)``. It syncs on every checked call, so it is for finding
a bad caller, not for serving or for CUDA-graph capture.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Index dtypes that convert to int64 without changing a value (uint16/32/64 would wrap).
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)

_debug = os.environ.get("FASTDECODE_DEBUG_CHECKS", "0") == "1"


def set_debug_checks(enabled: bool) -> bool:
    """Turn the host value checks on (True) or off (False) for CUDA tensors; returns the previous
    setting. CPU tensors are always checked. Same effect as ``FASTDECODE_DEBUG_CHECKS=1``."""
    global _debug
    previous, _debug = _debug, bool(enabled)
    return previous


def debug_checks() -> bool:
    """Whether the debug mode (host value checks for CUDA tensors too) is on."""
    return _debug


def host_checks(device: torch.device) -> bool:
    """Whether the value checks of a call on ``device`` run on the host."""
    return device.type == "cpu" or _debug


def check_device(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    """Every tensor of a call on ``device``, a CPU or CUDA device (None entries are skipped)."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors must be on a CPU or CUDA device, got {device}")
    same_device(device, **tensors)


def same_device(device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    """Every tensor (None entries skipped) on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, but the call's tensors are on {device}: "
                             "every tensor of a call must be on one device")


def check_float(name: str, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """``t`` is float32 / float16 / bfloat16, and ``dtype`` when given."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} != cache dtype {dtype}: the tensors of a call "
                        "share one float dtype")


def check_index(name: str, t: torch.Tensor, shape: tuple[Optional[int], ...],
                meaning: str) -> None:
    """``t`` is an integer tensor (an INDEX_DTYPES member) of ``shape`` (None: any size), which
    ``meaning`` explains in the error."""
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}] ({meaning}), got {list(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {t.dtype}")


def to_index(t: torch.Tensor, dtype: torch.dtype, low: int, high: int) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor. A value outside [low, high] is clamped to that
    bound first, so a wide id is never truncated into a valid one: the caller picks bounds that
    are themselves invalid (e.g. -1 and num_blocks for block ids). No host sync."""
    if t.dtype == torch.int64 and dtype == torch.int32:
        t = t.clamp(low, high)
    elif t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def host(t: torch.Tensor) -> np.ndarray:
    """The values of ``t`` as a host int64 / float64 array (a copy only for device tensors)."""
    if t.requires_grad:
        t = t.detach()
    a = (t if t.device.type == "cpu" else t.cpu()).numpy()
    return a.astype(np.float64 if a.dtype.kind == "f" else np.int64, copy=False)


def first(mask: np.ndarray) -> tuple[int, ...]:
    """The index of the first True entry of ``mask``."""
    return tuple(int(i) for i in np.argwhere(mask)[0])


def real(name: str, value, *, low: Optional[float] = None, what: str = "a finite number"
         ) -> float:
    """``value`` as a float: a real number (not bool), finite in float32, > ``low`` if given."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x) or abs(x) > FLOAT32_MAX or (low is not None and not x > low):
        raise ValueError(f"{name} must be {what}, got {value}")
    return x


def integer(name: str, value) -> int:
    """``value`` as an int: an integral number (not bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` (same device) intersect."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + _span_bytes(b) and b0 < a0 + _span_bytes(a)


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from the first element of ``t`` to one past its last (0 when empty)."""
    if t.is_contiguous() or not t.numel():
        return t.nbytes
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()
