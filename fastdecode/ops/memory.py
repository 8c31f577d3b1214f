"""Paged KV-cache allocation.

A decode step reads every sequence's blocks, which sit at scattered places in a pool of hundreds
of MB. With 4 KiB pages nearly every block costs TLB misses and page walks before its first byte
arrives; on CPU the pools are therefore placed in transparent huge pages (2 MiB) where Linux
allows it (``madvise(MADV_HUGEPAGE)``, honoured when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``). Elsewhere, and on
GPUs, these are plain ``torch.zeros``.

    k_cache, v_cache = fastdecode.ops.allocate_kv_cache(num_blocks, block_size, num_kv_heads,
                                                        head_dim, dtype=torch.bfloat16)
"""

from __future__ import annotations

import math
import mmap
import sys

import torch

HUGE_PAGE = 2 << 20
_CAN_ADVISE = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def zeros(shape: tuple[int, ...], *, dtype: torch.dtype,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.zeros(shape)``, contiguous; on a Linux CPU a tensor of at least 2 MiB lives in a
    fresh anonymous mapping, starts on a 2 MiB boundary and is advised for huge pages before its
    first touch (the zero fill), so that the kernel backs it with huge pages when it can. Where
    it cannot, the tensor is the same, on 4 KiB pages."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < HUGE_PAGE or not _CAN_ADVISE:
        return torch.zeros(shape, dtype=dtype, device=device)
    # One huge page of slack so that the tensor can start on a boundary: never touched, so it
    # costs no RAM. The tensor keeps the mapping alive; it is unmapped when the tensor dies.
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except OSError:  # refused (huge pages disabled): 4 KiB pages
        pass
    return raw[start:start + nbytes].view(dtype).view(shape).zero_()


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-filled K and V pools for the paged ops, each ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` ([N, P, Hkv, D]), contiguous, huge-page backed on CPU where possible (see the
    module docstring). Raises ValueError naming a size that is not a positive integer."""
    sizes = {"num_blocks": num_blocks, "block_size": block_size, "num_kv_heads": num_kv_heads,
             "head_dim": head_dim}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return zeros(shape, dtype=dtype, device=device), zeros(shape, dtype=dtype, device=device)
