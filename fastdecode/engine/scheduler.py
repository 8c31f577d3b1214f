"""Continuous batching: which tokens of which requests go into the next forward pass.

Each step packs, under ``max_batch_tokens``: first one decode token per running request
(oldest first), then the next chunks of prompts being prefilled, then chunks of waiting prompts
admitted in FIFO order while ``max_num_seqs`` and the free blocks allow. When a running request
needs a block and none is free, the newest running request is preempted: its blocks are freed
and it goes back to the front of the waiting queue, to be recomputed (prompt + generated
tokens) once blocks are free again. No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fastdecode.engine.block_manager import BlockManager
from fastdecode.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: ``num_new[i]`` tokens of ``seqs[i]``, starting at its ``num_computed``.

    Decode entries come first. ``block_copies``: ``(src, dst)`` copy-on-write block copies to
    apply before the forward pass.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_decode_tokens: int = 0
    num_prefill_tokens: int = 0

    def samples(self, i: int) -> bool:
        """Whether entry ``i`` reaches the end of its tokens, so that a new token is drawn."""
        return self.seqs[i].num_computed + self.num_new[i] == self.seqs[i].num_tokens


def is_decode(seq: Sequence) -> bool:
    """One generated token left to feed (a recomputation after preemption counts as prefill)."""
    return seq.num_pending == 1 and seq.num_generated > 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_batch_tokens: int) -> None:
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_num_seqs and max_batch_tokens must be >= 1, got "
                             f"{max_num_seqs}, {max_batch_tokens}")
        self.blocks = block_manager
        # Every running request needs a token per step, so more could never run together.
        self.max_num_seqs = min(max_num_seqs, max_batch_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (running or waiting) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.finish(reason)

    def schedule(self) -> ScheduledBatch:
        batch: dict[Sequence, int] = {}
        copies: list[tuple[int, int]] = []
        budget = self.max_batch_tokens
        preempted = False
        self.running.sort(key=lambda s: s.arrival)
        for seq in sorted(self.running, key=lambda s: not is_decode(s)):  # stable: oldest first
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_pending, budget)
            if n == 0:
                break
            while not self.blocks.can_append(seq.block_table, seq.num_computed, n):
                victim = self.running[-1]
                # A victim already batched gives its tokens back; a copy-on-write copy queued
                # for it may stay: its destination block is free, writing it is harmless.
                budget += batch.pop(victim, 0)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                copies += self.blocks.append_slots(seq.block_table, seq.num_computed, n)
                batch[seq] = n
                budget -= n
        # After a preemption blocks are short: admitting more would only thrash.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if not self.blocks.can_allocate(n):
                # FIFO: nobody overtakes the head of the queue. It waits for blocks to free up,
                # unless nothing runs: then a chunk too large for the whole cache would wait
                # forever, so it starts with the prefix that fits.
                n = 0 if self.running else self.blocks.admissible_tokens()
                if n == 0:
                    break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            copies += self.blocks.append_slots(seq.block_table, seq.num_computed, n)
            batch[seq] = n
            budget -= n
        out = ScheduledBatch(list(batch), list(batch.values()), copies)
        for seq, n in batch.items():
            if is_decode(seq):
                out.num_decode_tokens += n
            else:
                out.num_prefill_tokens += n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
