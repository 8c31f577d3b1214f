"""Helpers shared by the Triton launchers (no kernels here)."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_loads(dtype: torch.dtype) -> bool:
    """Whether kernels should convert 16-bit loads to float32 at once: the interpreter keeps
    bfloat16 as raw integers in some operations, so it only sees float32 math."""
    return interpreting() and dtype != torch.float32


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))
