"""append_kv on every backend: exact writes through the slot mapping, skipped padding slots,
untouched other slots, strided inputs, and an append -> attention round trip."""

from __future__ import annotations

import pytest
import torch

import fastdecode.ops as ops
from paged_cases import PagedCase, check_attention
from pairwise import cases

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def expected_caches(key, value, k_cache, v_cache, slots):
    """The caches after the append, computed one token at a time."""
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    p = k_cache.shape[1]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_exp[slot // p, slot % p] = key[t]
            v_exp[slot // p, slot % p] = value[t]
    return k_exp, v_exp


@pytest.mark.parametrize(*cases({"dtype": DTYPES, "head_dim": [64, 80, 96, 112, 128, 256],
                                 "num_kv_heads": [1, 2, 8], "block_size": [1, 16, 256],
                                 "num_tokens": [1, 3, 17, 300], "strided": [False, True]}))
def test_append_kv(backend, dtype, head_dim, num_kv_heads, block_size, num_tokens, strided):
    if backend.interpreted:
        num_tokens = min(num_tokens, 17)
    dev = backend.device
    num_blocks = (num_tokens + 5) // block_size + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape).to(dtype)
    v_cache = torch.randn(shape).to(dtype)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[::4] = -1  # padding tokens: skipped
    # strided: key / value are slices of a fused projection output [T, 3, Hkv, D].
    fused = torch.randn(num_tokens, 3, num_kv_heads, head_dim).to(dtype)
    key, value = fused[:, 0], fused[:, 2]
    k_exp, v_exp = expected_caches(key, value, k_cache, v_cache, slots)
    k_dev, v_dev = k_cache.to(dev), v_cache.to(dev)
    fused_dev = fused.to(dev)
    key_dev, value_dev = ((fused_dev[:, 0], fused_dev[:, 2]) if strided
                          else (key.contiguous().to(dev), value.contiguous().to(dev)))
    ops.append_kv(key_dev, value_dev, k_dev, v_dev, slots.to(dev), backend=backend.name)
    assert torch.equal(k_dev.cpu(), k_exp)
    assert torch.equal(v_dev.cpu(), v_exp)


def test_all_padding(backend):
    k_cache = torch.randn(4, 16, 2, 64, device=backend.device)
    before = k_cache.clone()
    key = torch.randn(5, 2, 64, device=backend.device)
    slots = torch.full((5,), -1, dtype=torch.int64, device=backend.device)
    ops.append_kv(key, key, k_cache, k_cache, slots, backend=backend.name)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("block_size,pool", [(1, "full"), (16, "full"), (16, "allocated")])
def test_append_then_attend(backend, block_size, pool):
    """Prefill three prompts into shuffled blocks with append_kv, then decode one token each:
    attention over the cache equals the reference on the same cache. pool: a cache filled with
    7.0 (never read: all overwritten), or an 8 MB one from allocate_kv_cache (on a Linux CPU,
    a view into a huge-page mapping)."""
    hq, hkv, d = 8, 2, 64
    lens = [5, 33, 18]
    m = max(lens) // block_size + 2
    num_blocks = len(lens) * m if pool == "full" else 1030
    tables = torch.randperm(num_blocks)[: len(lens) * m].view(len(lens), m).to(torch.int32)
    shape = (num_blocks, block_size, hkv, d)
    if pool == "full":
        k_cache = torch.full(shape, 7.0).to(backend.device)
        v_cache = torch.full(shape, 7.0).to(backend.device)
    else:
        k_cache, v_cache = ops.allocate_kv_cache(*shape, device=backend.device)
    pos = torch.cat([torch.arange(n) for n in lens])
    seq = torch.cat([torch.full((n,), b) for b, n in enumerate(lens)])
    slots = tables[seq, pos // block_size].long() * block_size + pos % block_size
    key, value = torch.randn(len(pos), hkv, d), torch.randn(len(pos), hkv, d)
    ops.append_kv(key.to(backend.device), value.to(backend.device), k_cache, v_cache,
                  slots.to(backend.device), backend=backend.name)
    case = PagedCase(torch.randn(len(lens), hq, d), k_cache.cpu(), v_cache.cpu(), tables,
                     torch.tensor(lens, dtype=torch.int32))
    check_attention(backend, case)
