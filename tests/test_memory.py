"""allocate_kv_cache: zero-filled [N, P, Hkv, D] pools, huge-page backed on Linux CPUs where the
kernel allows (that every backend reads and writes them: test_append_kv.test_append_then_attend)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import fastdecode.ops as ops
from fastdecode.ops import memory

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anon_huge_kb(ptr: int) -> int:
    """AnonHugePages of the mapping of this process that holds address ``ptr`` (/proc smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) <= ptr < int(head[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_blocks", [3, 601])  # 96 KiB (plain zeros) and ~4.7 MiB pools
def test_pools(dtype, num_blocks):
    k, v = ops.allocate_kv_cache(num_blocks, 16, 3, 40, dtype=dtype)
    for pool in (k, v):
        assert pool.shape == (num_blocks, 16, 3, 40) and pool.dtype == dtype
        assert pool.is_contiguous() and not pool.any()
    k.fill_(1)
    assert not v.any(), "K and V pools share memory"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages: Linux only")
def test_large_pool_is_huge_page_aligned_and_backed():
    k, _ = ops.allocate_kv_cache(300, 16, 8, 128)  # 19.7 MB
    assert k.data_ptr() % memory.HUGE_PAGE == 0
    mode = THP_MODE.read_text() if THP_MODE.exists() else "[never]"
    if "[never]" in mode:
        pytest.skip("transparent huge pages are disabled on this machine")
    assert anon_huge_kb(k.data_ptr()) >= memory.HUGE_PAGE // 1024


@pytest.mark.parametrize("name,value", [("num_blocks", 0), ("block_size", -16),
                                        ("num_kv_heads", 2.0), ("head_dim", True)])
def test_bad_sizes(name, value):
    sizes = dict(num_blocks=4, block_size=16, num_kv_heads=2, head_dim=64)
    sizes[name] = value
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        ops.allocate_kv_cache(**sizes)

