"""``backend="triton"``: Triton kernels for every op (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1)."""
from __future__ import annotations

import os


def unavailable_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return "Triton kernels not implemented yet"
