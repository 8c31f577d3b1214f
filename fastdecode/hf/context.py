"""Per-step metadata of a paged forward pass, shared by ``fastdecode.generate`` and the Engine.

A step packs the new tokens of B sequences into one flat batch of T tokens (the model sees
``input_ids [1, T]`` with explicit ``position_ids``). The context travels to every attention layer
as the forward keyword ``fastdecode_ctx``; the attention function appends each layer's keys and
values at ``slot_mapping`` and runs ``ops.paged_attention`` over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PagedContext:
    """block_tables: [B, M] int32; seq_lens: [B] int32 KV lengths after this step's tokens;
    cu_seqlens_q: [B + 1] int32 offsets of each sequence's tokens in the packed batch;
    slot_mapping: [T] int64 cache slot of each new token (-1 = skip);
    decode_only: every sequence has exactly one new token (the decode form of the kernel runs);
    logits_indices: [B] int64 packed index of each sequence's last token (whose logits are kept);
    backend: ops backend name ("auto" unless testing a specific one).
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
