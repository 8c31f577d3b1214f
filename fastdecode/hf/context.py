"""Per-step metadata of a paged forward pass built from Python lists, for one-off steps.

A step packs the new tokens of B sequences into one flat batch of T tokens (the model sees
``input_ids [1, T]`` with explicit ``position_ids``). ``fastdecode.generate`` and the Engine
build their steps with :class:`fastdecode.plan.StepPlanner` (preallocated buffers, one upload);
a :class:`PagedContext` is the same metadata made with fresh tensors, which
:meth:`PagedRunner.forward <fastdecode.hf.runner.PagedRunner.forward>` turns into a
:class:`~fastdecode.plan.StepPlan` (:meth:`PagedContext.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastdecode.plan import AttentionMeta, StepPlan


@dataclass
class PagedContext:
    """block_tables: [B, M] int32; seq_lens: [B] int32 KV lengths after this step's tokens;
    cu_seqlens_q: [B + 1] int32 offsets of each sequence's tokens in the packed batch;
    slot_mapping: [T] int64 cache slot of each new token (-1 = skip);
    decode_only: every sequence has exactly one new token (the decode form of the kernel runs);
    logits_indices: [B] int64 packed index of each sequence's last token (whose logits are kept);
    backend: kept for callers of earlier releases; the runner's backend runs every call;
    workspace: float32 scratch of split-KV decode kernels, or None.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    slot_mapping: torch.Tensor
    decode_only: bool
    logits_indices: torch.Tensor
    backend: str = "auto"
    workspace: Optional[torch.Tensor] = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def plan(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor) -> StepPlan:
        """The step plan of this context; input_ids, positions: [T] int64."""
        attn = AttentionMeta(self.block_tables, self.seq_lens, self.cu_seqlens_q,
                             self.slot_mapping, self.decode_only, workspace=self.workspace)
        return StepPlan(input_ids, positions, attn,
                        None if self.decode_only else self.logits_indices, self.num_seqs)

    @classmethod
    def build(cls, block_tables: list[list[int]], seq_lens: list[int], query_lens: list[int],
              block_size: int, device, backend: str = "auto") -> "PagedContext":
        """Context of one step from host-side scheduling data.

        block_tables: B lists of block ids (ragged; padded with 0 to M columns).
        seq_lens: KV length of each sequence after this step's tokens.
        query_lens: new tokens of each sequence in this step (packed in order, T = sum).
        The new tokens of sequence b are its positions ``seq_lens[b] - query_lens[b] ..
        seq_lens[b] - 1``; their slots come from the block table.
        """
        if not len(block_tables) == len(seq_lens) == len(query_lens):
            raise ValueError("block_tables, seq_lens and query_lens must have one entry per sequence")
        width = max([len(t) for t in block_tables] + [1])
        slots, cu = [], [0]
        for table, kv_len, q_len in zip(block_tables, seq_lens, query_lens):
            if not 1 <= q_len <= kv_len or kv_len > len(table) * block_size:
                raise ValueError(f"sequence with {q_len} new tokens, KV length {kv_len} and "
                                 f"{len(table)} blocks of {block_size} is inconsistent")
            slots += [table[i // block_size] * block_size + i % block_size
                      for i in range(kv_len - q_len, kv_len)]
            cu.append(cu[-1] + q_len)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(block_tables=tensor(padded, torch.int32).view(len(padded), width),
                   seq_lens=tensor(seq_lens, torch.int32),
                   cu_seqlens_q=tensor(cu, torch.int32),
                   slot_mapping=tensor(slots, torch.int64),
                   decode_only=all(q == 1 for q in query_lens),
                   logits_indices=tensor([c - 1 for c in cu[1:]], torch.int64),
                   backend=backend)
