"""Writing new keys / values into the paged KV cache.

Cache layout: ``[num_blocks, block_size, num_kv_heads, head_dim]`` contiguous, so the
``num_kv_heads * head_dim`` values of one slot are contiguous and a slot's offset is
``slot * stride(1)``: each program copies one flat chunk of one token. Device-side guard: a slot
outside [0, num_blocks * block_size) is skipped like a negative one (on CUDA tensors the public
op does not copy slot_mapping to the host), so nothing is written outside the pool.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: one token of a typical model (8 heads x 128) in one program.
APPEND_BLOCK = 1024


@triton.jit
def _append_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_slot,
    head_dim, token_numel, num_slots,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if (slot < 0) | (slot >= num_slots):  # padding token (or guarded): cache untouched
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < token_numel
    head = offs // head_dim
    dim = offs % head_dim
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(value_ptr + token64 * stride_vt + head * stride_vh + dim, mask=mask)
    dst = slot.to(tl.int64) * stride_cache_slot + offs
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def append_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim] (last dim contiguous, else copied);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] contiguous;
    slot_mapping: [num_tokens] int64, negative (or >= num_blocks * block_size) = skip. Writes the
    caches in place."""
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    num_tokens, num_kv_heads, head_dim = key.shape
    token_numel = num_kv_heads * head_dim
    if num_tokens == 0:
        return
    grid = (num_tokens, triton.cdiv(token_numel, APPEND_BLOCK))
    _append_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), k_cache.stride(1),
        head_dim, token_numel, k_cache.shape[0] * k_cache.shape[1],
        BLOCK=APPEND_BLOCK, num_warps=4,
    )
