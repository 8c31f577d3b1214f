"""Next-token selection with HF's processor order, through fastdecode's sampling ops.

HF order: repetition penalty -> n-gram blocking -> bad words -> min-length EOS ban -> remove
invalid values -> user logits processors -> temperature -> top-k -> top-p -> min-p -> draw
(``do_sample``) or argmax.
Without user processors, ``output_scores`` or ``remove_invalid_values`` the whole chain is one
fused sampling call (the n-gram and bad-words bans and the EOS ban are applied to the raw logits
first: they only put ``-inf``, which commutes with the penalty), through a
:class:`fastdecode.plan.Sampler`: the parameters, checked once, are cached scalars and the
backend is resolved once.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode import ops
from fastdecode.hf import compat
from fastdecode.hf.options import Options
from fastdecode.engine.params import SamplingParams
from fastdecode.plan.sampling import Sampler
from fastdecode.processors import BannedSequences, block_repeated_ngrams, remove_invalid_values


class TokenSelector:
    """Maps a step's raw logits [B, V] float32 to (next tokens [B] int64, scores [B, V] | None).

    ``scores`` (HF's processed scores) are computed only when ``need_scores``, when user processors
    run or with ``remove_invalid_values``; otherwise sampling is one fused kernel call.
    """

    def __init__(self, opts: Options, user_processors, need_scores: bool, backend: str):
        self.do_sample = opts.do_sample
        self.penalty = opts.repetition_penalty
        # HF adds a top-p warper only below 1 and keeps one token at top_p = 0.
        top_p = min(opts.top_p, 1.0) if opts.top_p > 0 else torch.finfo(torch.float32).tiny
        self.warp = dict(temperature=opts.temperature, top_k=max(opts.top_k, 0), top_p=top_p,
                         min_p=opts.min_p)
        self.user = list(user_processors or [])
        self.remove_invalid = opts.remove_invalid_values
        self.need_scores = need_scores or bool(self.user) or self.remove_invalid
        self.eos = opts.eos
        self.bad_words = opts.bad_words
        self.ngram_size = opts.no_repeat_ngram_size
        self.backend = backend
        self._banned: Optional[BannedSequences] = None
        self._eos_ids: Optional[torch.Tensor] = None
        # The fused draw's parameters, if they pass the rules (else ops.sample raises its error).
        self._row: Optional[SamplingParams] = None
        if self.do_sample:
            try:
                self._row = SamplingParams(**self.warp, repetition_penalty=self.penalty)
            except ValueError:
                pass
        self._sampler: Optional[Sampler] = None

    def __call__(self, logits: torch.Tensor, sequences: torch.Tensor, seen: Optional[torch.Tensor],
                 ban_eos: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """logits: [B, V] float32 (not modified); sequences: [B, cur_len] ids so far (with
        padding, as HF's processors see them); seen: [B, cur_len] ids for the repetition penalty,
        -1 = not penalised; ban_eos: the min-length rule forbids EOS this step."""
        penalised = self.penalty != 1.0
        if not self.need_scores:
            logits = self._mask(logits, sequences, ban_eos)
            if self._row is not None:
                if self._sampler is None:
                    self._sampler = Sampler(logits.shape[-1], logits.device, self.backend)
                seen = seen.contiguous() if penalised else None
                return self._sampler.sample(logits, self._sampler.shared(
                    logits.shape[0], self._row, seen)), None
            if self.do_sample:
                return ops.sample(logits, **self.warp, repetition_penalty=self.penalty,
                                  seen_tokens=seen if penalised else None,
                                  backend=self.backend), None
            if penalised:
                logits = ops.apply_repetition_penalty(logits, seen, self.penalty,
                                                      backend=self.backend)
            return logits.argmax(-1), None
        scores = self.process(logits, sequences, seen, ban_eos)
        if not self.do_sample:
            return scores.argmax(-1), scores
        scores = ops.process_logits(scores, **self.warp, backend=self.backend)
        return ops.sample(scores, backend=self.backend), scores

    def process(self, logits: torch.Tensor, sequences: torch.Tensor, seen: Optional[torch.Tensor],
                ban_eos: bool) -> torch.Tensor:
        """HF's processors before the warpers (arguments as in ``__call__``) -> [B, V] float32,
        a new tensor (``logits`` is not modified)."""
        scores = (ops.apply_repetition_penalty(logits, seen, self.penalty, backend=self.backend)
                  if self.penalty != 1.0 else logits)
        scores = self._mask(scores, sequences, ban_eos)
        if self.remove_invalid:
            scores = remove_invalid_values(scores)
        if scores is logits:
            scores = logits.clone()  # HF returns the processed scores as a new tensor
        for processor in self.user:
            scores = processor(sequences, scores)
        return scores

    def _mask(self, scores: torch.Tensor, sequences: torch.Tensor, ban_eos: bool) -> torch.Tensor:
        """N-gram blocking, bad words and the min-length EOS ban; returns a new tensor when it
        changes anything."""
        vocab = scores.shape[-1]
        if self.ngram_size:
            scores = block_repeated_ngrams(scores, sequences, self.ngram_size)
        if self.bad_words:
            if self._banned is None:
                self._banned = BannedSequences(self.bad_words, vocab, scores.device,
                                               compat.bad_words_need_whole_sequence())
            scores = self._banned(scores, sequences)
        if ban_eos:
            if self._eos_ids is None:  # EOS ids outside the vocabulary are ignored, as in HF
                ids = torch.tensor(self.eos, device=scores.device)
                self._eos_ids = ids[(ids >= 0) & (ids < vocab)]
            scores = scores.index_fill(1, self._eos_ids, float("-inf"))
        return scores
