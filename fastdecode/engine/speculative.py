"""Speculative decoding per request in the Engine (prompt lookup, or a draft model).

A decode step of a request with ``prompt_lookup_num_tokens`` feeds its last token and ``k``
draft tokens (:func:`fastdecode.speculation.lookup_draft`) in the step's packed forward pass;
with ``num_speculative_tokens`` the scheduler reserves ``k`` slots (:data:`PENDING` tokens)
that the draft model fills at the start of the step (:mod:`fastdecode.engine.draft`).
The step draws a token after each of the ``k + 1`` positions with the request's own sampling
parameters (a :class:`Position` per draw: its history includes the drafts before it, so
penalties, n-gram / bad-words bans and ``min_new_tokens`` apply as they would without
speculation, and a seeded draw depends on its position only). The drafts equal to the draws
before them are kept (:func:`fastdecode.speculation.accepted_prefix`), then the draw after them;
the scheduler rolls the rejected drafts' cache slots back.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.engine.params import SamplingParams
from fastdecode.engine.sequence import Sequence
from fastdecode.speculation import accepted_prefix, lookup_draft


# A draft token the draft model is yet to propose.
PENDING = -1


def propose(seq: Sequence, budget: int, max_model_len: Optional[int]) -> list[int]:
    """The draft of a decode step of ``seq`` with at most ``budget`` tokens in all (PENDING
    tokens for a draft model); drafts never reach past max_new_tokens or the context (the step
    adds a token after them)."""
    p = seq.params
    room = min(p.prompt_lookup_num_tokens or p.num_speculative_tokens, budget - 1,
               p.max_new_tokens - seq.num_generated - 1)
    if max_model_len is not None:
        room = min(room, max_model_len - seq.num_tokens - 1)
    if room <= 0:
        return []
    if p.num_speculative_tokens:
        return [PENDING] * room
    return lookup_draft(seq.token_ids, p.max_matching_ngram_size, room, seq.stop_ids)


class Position:
    """A draw after the request's tokens and its first ``drafts``: what the sampler and the
    history masks read of a request (``token_ids`` is built only if they read it: for a
    repetition penalty or a history mask)."""

    __slots__ = ("params", "stop_ids", "num_generated", "num_tokens", "_tokens", "_drafts")

    def __init__(self, seq: Sequence, drafts: list[int]) -> None:
        self.params: SamplingParams = seq.params
        self.stop_ids = seq.stop_ids
        self.num_generated = seq.num_generated + len(drafts)
        self.num_tokens = seq.num_tokens + len(drafts)
        self._tokens, self._drafts = seq.token_ids, drafts

    @property
    def token_ids(self) -> list[int]:
        return self._tokens + self._drafts


def positions(seqs: list[Sequence], drafts: list[list[int]]) -> list:
    """One draw per position of each drawing request (the request itself without drafts)."""
    return [p for seq, d in zip(seqs, drafts)
            for p in ([seq] if not d else [Position(seq, d[:j]) for j in range(len(d) + 1)])]


def accept(drawn: list[int], drafts: list[list[int]]) -> list[list[int]]:
    """drawn: a token per position (:func:`positions` order) -> each request's new tokens:
    its accepted drafts, then the draw after them."""
    width = max(map(len, drafts))
    choice = torch.full((len(drafts), width + 1), -1, dtype=torch.int64)
    padded = torch.zeros(len(drafts), width, dtype=torch.int64)
    start = 0
    for row, d in enumerate(drafts):
        choice[row, :len(d) + 1] = torch.tensor(drawn[start:start + len(d) + 1])
        padded[row, :len(d)] = torch.tensor(d, dtype=torch.int64)
        start += len(d) + 1
    lengths = torch.tensor([len(d) for d in drafts])
    kept, following = accepted_prefix(choice, padded, lengths)
    return [d[:n] + [t] for d, n, t in zip(drafts, kept.tolist(), following.tolist())]
