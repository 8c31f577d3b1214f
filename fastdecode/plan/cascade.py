"""Shared-prefix ("cascade") decode attention on the CPU.

When every sequence of a decode step starts with the same cache blocks (a shared system prompt
served from the prefix cache), the decode kernel would read those blocks once per sequence.
Here the step's B query rows attend to the shared blocks in one packed, non-causal call (the
rows of one kv head then share every key row they load, as in a small GEMM), each sequence
attends to its own remaining blocks in a decode call, and the two normalised partial results
are merged exactly with their log-sum-exps (the merge of FlashInfer's cascade attention).

Only the prefix common to every row of the step is used, and only without sliding window,
ALiBi or relative bias (their masks and biases depend on each row's position): other steps take
the plain decode kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

# Shared blocks worth a second kernel call and a merge: below this the call overheads (two
# launches, the merge's few elementwise ops) outweigh the key rows saved.
MIN_SHARED_BLOCKS = 4
MIN_SEQS = 4


@dataclass
class SharedPrefix:
    """The leading blocks that every sequence of a B-sequence decode step reads.

    tables: [1, C] int32 the C shared block ids; lens: [1] int32 (C * P tokens); cu_seqlens:
    [2] int32 (0, B): the step's B query rows as one packed sequence of the shared call;
    suffix_tables: [B, M - C] int32 each sequence's remaining blocks; suffix_lens: [B] int32
    its tokens past the shared ones (>= 1: the step's own token is never in a shared block).
    """

    tables: torch.Tensor
    lens: torch.Tensor
    cu_seqlens: torch.Tensor
    suffix_tables: torch.Tensor
    suffix_lens: torch.Tensor


def shared_blocks(tables: np.ndarray, kv_lens: np.ndarray, block_size: int) -> int:
    """Leading block columns equal in every row of ``tables`` ([B, M] int32) and full in every
    sequence short of its last token (kv_lens: [B] KV lengths after the step)."""
    limit = int((kv_lens.min() - 1) // block_size)
    same = (tables[:, :limit] == tables[:1, :limit]).all(axis=0)
    return int(limit if same.all() else np.argmin(same))


def plan_shared_prefix(tables: np.ndarray, kv_lens: np.ndarray,
                       block_size: int) -> Optional[SharedPrefix]:
    """The shared-prefix plan of a decode step (tables: [B, M] int32 block ids; kv_lens: [B]),
    or None when too few sequences or blocks are shared for it to pay."""
    b = tables.shape[0]
    if b < MIN_SEQS:
        return None
    c = shared_blocks(tables, kv_lens, block_size)
    if c < MIN_SHARED_BLOCKS:
        return None
    return SharedPrefix(
        tables=torch.from_numpy(tables[:1, :c].astype(np.int32)),
        lens=torch.tensor([c * block_size], dtype=torch.int32),
        cu_seqlens=torch.tensor([0, b], dtype=torch.int32),
        suffix_tables=torch.from_numpy(np.ascontiguousarray(tables[:, c:], dtype=np.int32)),
        suffix_lens=torch.from_numpy((kv_lens - c * block_size).astype(np.int32)))


def attend_shared_prefix(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         plan: SharedPrefix, out: torch.Tensor, *, scale: float,
                         softcap: float) -> None:
    """Decode attention of query [B, Hq, D] over caches [N, P, Hkv, D] into out [B, Hq, D]
    (the query's dtype): the shared blocks and each sequence's own, merged. softcap 0 = off."""
    ops = torch.ops.fastdecode  # loaded with the cpu backend (PagedKVCache.shared_prefix_decode)
    b, hq, _ = query.shape
    shared = torch.empty_like(out)
    lse = torch.empty(2, b, hq, dtype=torch.float32)
    ops.paged_attention_lse(shared, lse[0], query, k_cache, v_cache, plan.tables, plan.lens,
                            plan.cu_seqlens, scale, False, softcap)
    ops.paged_attention_lse(out, lse[1], query, k_cache, v_cache, plan.suffix_tables,
                            plan.suffix_lens, None, scale, True, softcap)
    # Weights of the two normalised parts: softmax over their log-sum-exps (the own part always
    # has a key, so its weight is finite and the sum is > 0).
    w = torch.softmax(lse, dim=0).unsqueeze(-1)
    if out.dtype == torch.float32:
        out.mul_(w[1]).addcmul_(shared, w[0])
    else:
        out.copy_(out.float() * w[1] + shared.float() * w[0])
