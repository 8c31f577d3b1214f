"""HF's history-dependent masks for the Engine's requests: ``no_repeat_ngram_size`` and
``bad_words_ids`` over each request's prompt + generated ids.

Rows that share a setting are masked in one batched call (:func:`fastdecode.processors.
block_repeated_ngrams`, :class:`fastdecode.processors.BannedSequences`), their ids left-padded with
-1 (which never matches a token).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from fastdecode.engine.sequence import Sequence
from fastdecode.processors import BannedSequences, block_repeated_ngrams


class HistoryMasks:
    """Applies the masks; keeps one :class:`BannedSequences` per distinct bad-words list."""

    def __init__(self, device: torch.device):
        self.device = device
        self._banned: dict[tuple, BannedSequences] = {}

    @staticmethod
    def needed(seqs: list[Sequence]) -> bool:
        return any(s.params.no_repeat_ngram_size or s.params.bad_words_ids for s in seqs)

    def prepare(self, seqs: list[Sequence]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Read the rows' settings and histories now (the requests may change after) and return
        the mask: logits [len(seqs), V] float32 (not modified) -> [len(seqs), V] float32 with
        the banned tokens at -inf."""
        ngram, words = defaultdict(list), defaultdict(list)
        for i, s in enumerate(seqs):
            if s.params.no_repeat_ngram_size:
                ngram[s.params.no_repeat_ngram_size].append(i)
            if s.params.bad_words_ids:
                words[s.params.bad_words_ids].append(i)
        ngram_groups = [(n, rows, self._history(seqs, rows)) for n, rows in ngram.items()]
        word_groups = [(key, rows, self._history(seqs, rows)) for key, rows in words.items()]

        def apply(logits: torch.Tensor) -> torch.Tensor:
            logits = logits.clone()
            for n, rows, history in ngram_groups:
                logits[rows] = block_repeated_ngrams(logits[rows], history, n)
            for key, rows, history in word_groups:
                if key not in self._banned:
                    self._banned[key] = BannedSequences(key, logits.shape[-1], self.device)
                logits[rows] = self._banned[key](logits[rows], history)
            return logits

        return apply

    def _history(self, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
        """[len(rows), L] int64 ids of the rows, left-padded with -1."""
        width = max(seqs[i].num_tokens for i in rows)
        return torch.tensor([[-1] * (width - seqs[i].num_tokens) + seqs[i].token_ids
                             for i in rows], dtype=torch.int64).to(self.device)
