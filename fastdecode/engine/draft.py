"""The Engine's draft model: a smaller model of the same vocabulary on a KV cache that mirrors
the target's (same block ids, same block size, its own keys and values).

Every step runs the draft over the step's packed tokens after drafting, so its cache holds the
same positions as the target's: block allocation, prefix caching, rollback of rejected drafts,
preemption and abort apply to both at once through the one block manager. Drafting runs ``k``
greedy decode passes over the requests that ask for it (a deterministic draft: the step's draws
verify it, see :mod:`fastdecode.speculation`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from fastdecode.plan import StepPlan


@dataclasses.dataclass
class DraftJob:
    """One request's drafting: its last token at KV index ``start`` (the step feeds it), its
    block table (room for ``count`` drafts after it), and where its drafts go in the step's
    packed input ids (``offset`` .. ``offset + count``)."""

    last: int
    start: int
    table: list[int]
    count: int
    offset: int


class DraftRunner:
    """model: the draft (a transformers causal LM); vocab_size: the target's vocabulary (draft
    ids beyond it are never proposed); the rest as the target's runner."""

    def __init__(self, model, *, vocab_size: int, block_size: int, num_blocks: int,
                 kv_dtype: Optional[torch.dtype], device: torch.device) -> None:
        from fastdecode.hf.runner import PagedRunner  # transformers only when a draft is given

        self.paged = PagedRunner(model, num_blocks=num_blocks, block_size=block_size,
                                 kv_dtype=kv_dtype, device=device)
        # Its own planner: drafting plans must not overwrite the step plan's staging buffer.
        self.planner = self.paged.planner()
        self.vocab_size = vocab_size

    def draft(self, jobs: list[DraftJob]) -> list[list[int]]:
        """Each job's ``count`` greedy draft tokens (one decode pass per draft position)."""
        drafts: list[list[int]] = [[] for _ in jobs]
        feed = [job.last for job in jobs]
        for j in range(max(job.count for job in jobs)):
            active = [i for i, job in enumerate(jobs) if job.count > j]
            plan = self.planner.build([1] * len(active),
                                      [jobs[i].start + j + 1 for i in active],
                                      [jobs[i].table for i in active],
                                      token_ids=[feed[i] for i in active])
            logits = self.paged.forward(plan.input_ids, plan.positions, plan)
            for i, tok in zip(active, logits[:, :self.vocab_size].argmax(-1).tolist()):
                drafts[i].append(tok)
                feed[i] = tok
        return drafts

    def mirror(self, plan: StepPlan) -> None:
        """Write the step's keys and values into the draft's cache (its logits unused)."""
        attn = plan.attn
        if attn.workspace is not None:  # sized for the target's heads
            attn = dataclasses.replace(attn, workspace=self.paged.kv.workspace(
                attn.num_seqs, attn.block_tables.shape[1]))
        self.paged.forward(plan.input_ids, plan.positions, dataclasses.replace(plan, attn=attn))
