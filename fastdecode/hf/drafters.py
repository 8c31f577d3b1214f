"""Draft proposers of speculative decoding (:mod:`fastdecode.hf.speculative`).

Both share one protocol over the B rows of a call::

    drafter.start(first)                      # first: [B] the first new token of each row
    drafts, lengths, probs = drafter.propose(sequences, room, done)
        # sequences: B host lists, each row's prompt (without padding) and new tokens so far;
        # room: the most draft tokens any row may take; done: B bools (finished rows draft nothing)
        # drafts: [B, K] int64, lengths: [B] int64 (<= K), probs: [B, K, V] float32 or None
    drafter.accept(accepted, next_tokens, done)   # [B] int64 each: what the target kept
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from fastdecode.hf.prepare import Prepared
from fastdecode.hf.steppers import PagedStepper
from fastdecode.speculation import lookup_draft

if TYPE_CHECKING:
    from fastdecode.hf.speculative import Verifier


class PromptLookup:
    """Drafts what followed an earlier occurrence of the row's last n-gram.

    Up to ``num_tokens`` draft tokens of :func:`fastdecode.speculation.lookup_draft` (n-grams
    of at most ``max_ngram`` tokens), cut before an EOS token; no match drafts nothing.
    """

    def __init__(self, num_tokens: int, max_ngram: int, eos: list[int] | None,
                 device: torch.device):
        if num_tokens <= 0 or max_ngram <= 0:
            raise ValueError(f"prompt_lookup_num_tokens ({num_tokens}) and "
                             f"max_matching_ngram_size ({max_ngram}) must be >= 1")
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.eos = set(eos or ())
        self.device = device

    def session(self):
        return nullcontext()

    def start(self, first: list[int]) -> None:
        pass

    def accept(self, accepted: torch.Tensor, next_tokens: torch.Tensor, done: list[bool]) -> None:
        pass

    def propose(self, sequences: list[list[int]], room: int, done: list[bool]):
        found = [[] if stop else lookup_draft(seq, self.max_ngram, min(room, self.num_tokens),
                                              self.eos)
                 for seq, stop in zip(sequences, done)]
        return _pad(found, self.device) + (None,)


class DraftModel:
    """A smaller model of the same vocabulary on its own paged cache, drafting ``num_tokens``
    tokens per round (greedy, or sampled from its distribution under the call's warp).

    schedule: "constant", or "heuristic" (+2 after a round where every row kept every draft, -1
    otherwise, at least 1; the count starts afresh with every call).
    """

    def __init__(self, model, prepared: Prepared, max_new_tokens: int, verifier: "Verifier",
                 vocab: int, num_tokens: int, schedule: str, backend: str):
        if num_tokens <= 0:
            raise ValueError(f"num_assistant_tokens must be >= 1, got {num_tokens}")
        # The draft sees the same prompt at the default positions (mask.cumsum - 1). Room for
        # twice the new tokens: a finished row still runs (and forgets) each round's drafts.
        own = replace(prepared, model_kwargs={})
        self.stepper = PagedStepper(model, own, 2 * max_new_tokens + 2, backend=backend)
        self.verifier, self.vocab = verifier, vocab
        self.num_tokens, self.schedule = num_tokens, schedule
        self.pending: list[list[int]] = []  # tokens of each row not yet in the draft's cache
        self._k = 0
        self._drafts = None

    def session(self):
        return self.stepper.session()

    def start(self, first: list[int]) -> None:
        self.stepper.prefill()
        self.pending = [[t] for t in first]

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, Vd] -> [B, V]: the target's vocabulary (ids the target lacks are never drafted)."""
        size = logits.shape[-1]
        if size >= self.vocab:
            return logits[:, :self.vocab]
        return torch.nn.functional.pad(logits, (0, self.vocab - size), value=float("-inf"))

    def propose(self, sequences: list[list[int]], room: int, done: list[bool]):
        device = self.stepper.device
        batch = len(self.pending)
        self._k = k = min(self.num_tokens, room)
        if k <= 0:
            empty = torch.zeros(batch, 0, dtype=torch.int64, device=device)
            return empty, torch.zeros(batch, dtype=torch.int64, device=device), None
        tokens = torch.tensor([t for row in self.pending for t in row], device=device)
        logits = self._logits(self.stepper.extend(tokens, [len(r) for r in self.pending]))
        drafts, probs = [], []
        for step in range(k):
            if self.verifier.do_sample:
                q = self.verifier.probabilities(logits)
                token = torch.multinomial(q, 1, generator=self.verifier.generator)[:, 0]
                probs.append(q)
            else:
                token = logits.argmax(-1)
            drafts.append(token)
            if step + 1 < k:
                logits = self._logits(self.stepper.decode(token, None))
        self._drafts = torch.stack(drafts, 1)
        lengths = torch.tensor([0 if stop else k for stop in done], device=device)
        return self._drafts, lengths, torch.stack(probs, 1) if probs else None

    def accept(self, accepted: torch.Tensor, next_tokens: torch.Tensor, done: list[bool]) -> None:
        k, nxt = self._k, next_tokens.tolist()
        if k <= 0:
            for row, token in zip(self.pending, nxt):
                row.append(token)
            return
        # The draft cache holds pending + d_1 .. d_{k-1}; keep pending + the accepted drafts.
        kept = accepted.tolist()
        added = [len(p) + k - 1 for p in self.pending]
        drop = [a if stop else k - 1 - min(n, k - 1)
                for a, n, stop in zip(added, kept, done)]
        self.stepper.rewind(torch.tensor(drop))
        last = self._drafts[:, -1].tolist()
        self.pending = [([d] if n == k else []) + [t] for d, n, t in zip(last, kept, nxt)]
        if self.schedule.startswith("heuristic"):
            full = all(n == k for n, stop in zip(kept, done) if not stop)
            self.num_tokens = self.num_tokens + 2 if full else max(1, self.num_tokens - 1)


def _pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged host lists -> ([B, K] int64 padded with 0, [B] int64 lengths)."""
    width = max([len(r) for r in rows] + [0])
    drafts = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, r in enumerate(rows):
        drafts[b, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return drafts.to(device), torch.tensor([len(r) for r in rows], device=device)
