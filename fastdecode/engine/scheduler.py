"""Continuous batching: which tokens of which requests go into the next forward pass.

Each step packs, under ``max_batch_tokens``: first one decode token per running request
(oldest first), then the next chunks of prompts being prefilled, then chunks of waiting prompts
admitted in FIFO order while ``max_num_seqs`` and the free blocks allow. A prompt whose first
full blocks are in the block manager's prefix cache (or are filled earlier in the same step)
starts after them (at least one token is always computed, to draw the first new token from).
When a running request needs a block and none is free, the newest running request is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed (prompt + generated tokens, from the prefix cache where its blocks are still there)
once blocks are free again. A decode step of a request with speculation (prompt lookup, or a
draft model) also feeds its draft tokens (:mod:`fastdecode.engine.speculative`) when the budget
and the free blocks allow; the slots of rejected drafts are given back in ``postprocess``.
``postprocess`` applies a step's results: every change to a request's state after scheduling
happens there. An encoder-decoder request also holds the blocks of its encoder's keys and values
(``Sequence.cross_table``, a fixed count): taken at admission with its first decoder blocks
(the step encodes it), freed with them on preemption (readmission encodes it again) and at the
end. No torch here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from fastdecode.engine import speculative
from fastdecode.engine.block_manager import BlockManager, cdiv
from fastdecode.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: ``num_new[i]`` tokens of ``seqs[i]``, starting at its ``num_computed``.

    Decode entries come first. ``block_copies``: ``(src, dst)`` copy-on-write block copies to
    apply before the forward pass. ``drafts[i]``: the draft tokens fed after the request's last
    token (the last ``len(drafts[i])`` of its ``num_new``; empty without speculation).
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)
    num_decode_tokens: int = 0
    num_prefill_tokens: int = 0

    def samples(self, i: int) -> bool:
        """Whether entry ``i`` reaches the end of its tokens, so that a new token is drawn."""
        seq = self.seqs[i]
        drafted = len(self.drafts[i]) if self.drafts else 0
        return seq.num_computed + self.num_new[i] - drafted == seq.num_tokens


def is_decode(seq: Sequence) -> bool:
    """One generated token left to feed (a recomputation after preemption counts as prefill)."""
    return seq.num_pending == 1 and seq.num_generated > 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_batch_tokens: int, max_model_len: Optional[int] = None) -> None:
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_num_seqs and max_batch_tokens must be >= 1, got "
                             f"{max_num_seqs}, {max_batch_tokens}")
        self.blocks = block_manager
        # Every running request needs a token per step, so more could never run together.
        self.max_num_seqs = min(max_num_seqs, max_batch_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_generated = 0
        self.num_draft_tokens = 0     # speculative drafts verified so far
        self.num_accepted_drafts = 0  # of which kept
        # Requests admitted on blocks a step was to fill, until that step's results come.
        self._unconfirmed: list[Sequence] = []

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, error: Optional[str] = None) -> None:
        """End ``seq`` (running or waiting) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._free(seq)
        seq.finish(reason, error)

    def schedule(self) -> ScheduledBatch:
        self._recover()
        batch: dict[Sequence, int] = {}
        drafts: dict[Sequence, list[int]] = {}
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
            draft = self._draft(seq, budget)
            n += len(draft)
            while not self.blocks.can_append(seq.block_table, seq.num_computed, n):
                victim = self.running[-1]
                # A victim already batched gives its tokens back; a copy-on-write copy queued
                # for it may stay: its destination block is free, writing it is harmless.
                budget += batch.pop(victim, 0)
                drafts.pop(victim, None)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                copies += self._append(seq, n)
                batch[seq] = n
                drafts[seq] = draft
                budget -= n
        # After a preemption blocks are short: admitting more would only thrash.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            hits, n = self._admission(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.blocks.share(seq.block_table, hits, seq.num_tokens)
            if seq.encoder_ids is not None:
                self.blocks.append_slots(seq.cross_table, 0, len(seq.encoder_ids))
            seq.num_cached_blocks = len(hits)
            seq.num_computed = len(hits) * self.blocks.block_size
            if any(self.blocks.is_expected(b) for b in hits):
                self._unconfirmed.append(seq)
            copies += self._append(seq, n)
            batch[seq] = n
            budget -= n
        out = ScheduledBatch(list(batch), list(batch.values()), copies,
                             [drafts.get(seq, []) for seq in batch])
        for seq, n in batch.items():
            if is_decode(seq):
                out.num_decode_tokens += n
            else:
                out.num_prefill_tokens += n
        return out

    def _draft(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for this step of ``seq``: none unless it decodes with speculation, and
        none when their blocks are not free (a plain step, not a preemption)."""
        p = seq.params
        if not ((p.prompt_lookup_num_tokens or p.num_speculative_tokens) and is_decode(seq)):
            return []
        draft = speculative.propose(seq, budget, self.max_model_len)
        if draft and not self.blocks.can_append(seq.block_table, seq.num_computed,
                                                1 + len(draft)):
            return []
        return draft

    def _append(self, seq: Sequence, n: int) -> list[tuple[int, int]]:
        """Give ``seq`` room for ``n`` more tokens this step; the blocks they fill are expected
        (later admissions of the step may share them)."""
        copies = self.blocks.append_slots(seq.block_table, seq.num_computed, n)
        self.blocks.hash_blocks(seq.token_ids, seq.block_hashes, seq.hash_seed)
        self.blocks.expect(seq.block_table, seq.block_hashes, seq.num_cached_blocks,
                           seq.num_computed + n)
        return copies

    def _recover(self) -> None:
        """Start a step. If the last one never reached ``postprocess`` (its forward pass
        failed), the blocks it was to fill may hold nothing: requests admitted on them start
        again from scratch."""
        self.blocks.clear_expected()
        for seq in self._unconfirmed:
            if seq.status is Status.RUNNING:
                self._preempt(seq)
        self._unconfirmed.clear()

    def _admission(self, seq: Sequence, budget: int) -> tuple[list[int], int]:
        """``(cached blocks to start from, tokens to compute now)`` for the head of the queue;
        0 tokens: it must wait."""
        self.blocks.hash_blocks(seq.token_ids, seq.block_hashes, seq.hash_seed)
        size = self.blocks.block_size
        hits = self.blocks.lookup(seq.block_hashes, (seq.num_tokens - 1) // size)
        n = min(seq.num_tokens - len(hits) * size, budget)
        cross = cdiv(len(seq.encoder_ids), size) if seq.encoder_ids is not None else 0
        if self.blocks.can_allocate(n, reserved=self.blocks.unheld(hits) + cross):
            return hits, n
        # FIFO: nobody overtakes the head of the queue. It waits for blocks to free up, unless
        # nothing runs: then a chunk too large for the whole cache would wait forever, so it
        # starts with the prefix that fits (computed, not taken from the cache). Encoder blocks
        # are taken whole: they may use the watermark (kept for running requests to grow).
        if self.running:
            return [], 0
        return [], min(seq.num_tokens, budget,
                       self.blocks.admissible_tokens(reserved=cross, watermark=not cross))

    def postprocess(self, batch: ScheduledBatch, tokens: list[Optional[list[int]]],
                    errors: dict[int, str]) -> list[Sequence]:
        """Apply a step's results; return the sequences that got a token or finished.

        tokens[i]: the new tokens of ``batch.seqs[i]``: its accepted drafts, then the token
        drawn after them (-1: the sampler found no finite logit); None for a prompt chunk
        short of the prompt's end. Tokens past one that ends the request are dropped, and
        the cache slots of rejected drafts are given back. errors[i]: why entry i
        could not be sampled. A failure ends that request alone, with finish_reason "error" and
        a message naming it; a request ended while the step ran (aborted) is left as it is.
        """
        self._unconfirmed.clear()
        changed = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            if seq.is_finished:
                continue
            seq.encoded = bool(seq.cross_table)  # the step wrote its encoder's keys
            new, error = tokens[i], errors.get(i)
            drafted = len(batch.drafts[i]) if batch.drafts else 0
            try:
                seq.num_computed += n - drafted
                if error is None and new is None:
                    self._cache(seq)
                    continue
                if error is None and new[-1] < 0:
                    error = "the sampler found no finite logit (NaN or all -inf logits)"
                reason = None
                if error is None:
                    if drafted:
                        self.num_draft_tokens += drafted
                        self.num_accepted_drafts += len(new) - 1
                    reason = self._take(seq, new)
                    # The accepted drafts' keys and values are in the cache; the rest go.
                    seq.num_computed = min(seq.num_computed + len(new) - 1, seq.num_tokens)
                    if drafted:
                        self.blocks.truncate(seq.block_table, seq.num_computed)
                self._cache(seq)
                if reason is not None:
                    self.finish(seq, reason)
            except Exception as exc:  # this request's own bookkeeping: the others go on
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                self.finish(seq, "error", f"request {seq.request_id!r}: {error}")
            changed.append(seq)
        return changed

    def _take(self, seq: Sequence, new: list[int]) -> Optional[str]:
        """Append ``new`` to ``seq`` up to the first token that ends it; why it ends, or
        None."""
        for tok in new:
            seq.token_ids.append(tok)
            self.num_generated += 1
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                return reason
        return None

    def _cache(self, seq: Sequence) -> None:
        """Offer the blocks this step filled to the prefix cache."""
        self.blocks.hash_blocks(seq.token_ids, seq.block_hashes, seq.hash_seed)
        seq.num_cached_blocks = self.blocks.cache_blocks(
            seq.block_table, seq.block_hashes, seq.num_cached_blocks, seq.num_computed)

    def _finish_reason(self, seq: Sequence, tok: int) -> Optional[str]:
        if tok in seq.stop_ids:  # masked by the sampler before min_new_tokens
            return "stop"
        if seq.num_generated >= seq.params.max_new_tokens:
            return "length"
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _free(self, seq: Sequence) -> None:
        """Give back the request's decoder and encoder blocks."""
        self.blocks.free(seq.block_table)
        self.blocks.free(seq.cross_table)
        seq.encoded = False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = seq.num_cached_blocks = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
