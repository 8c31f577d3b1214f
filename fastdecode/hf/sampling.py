"""Next-token selection with HF's processor order, through fastdecode's sampling ops.

HF order: repetition penalty -> min-length EOS ban -> user logits processors -> temperature ->
top-k -> top-p -> min-p -> draw (``do_sample``) or argmax. Without user processors and without
``output_scores`` the whole chain is one fused ``ops.sample`` call.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode import ops
from fastdecode.hf.options import Options


class TokenSelector:
    """Maps a step's raw logits [B, V] float32 to (next tokens [B] int64, scores [B, V] | None).

    ``scores`` (HF's processed scores) are computed only when ``need_scores`` or when user
    processors run; otherwise sampling is one fused kernel call.
    """

    def __init__(self, opts: Options, user_processors, need_scores: bool, backend: str):
        self.do_sample = opts.do_sample
        self.penalty = opts.repetition_penalty
        # HF adds a top-p warper only below 1 and keeps one token at top_p = 0.
        top_p = min(opts.top_p, 1.0) if opts.top_p > 0 else torch.finfo(torch.float32).tiny
        self.warp = dict(temperature=opts.temperature, top_k=max(opts.top_k, 0), top_p=top_p,
                         min_p=opts.min_p)
        self.user = list(user_processors or [])
        self.need_scores = need_scores or bool(self.user)
        self.eos = opts.eos
        self.backend = backend

    def __call__(self, logits: torch.Tensor, sequences: torch.Tensor, seen: torch.Tensor,
                 ban_eos: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """logits: [B, V] float32 (not modified); sequences: [B, cur_len] ids so far (with
        left padding, as HF's processors see them); seen: [B, cur_len] ids, -1 = padding;
        ban_eos: the min-length rule forbids EOS this step."""
        penalised = self.penalty != 1.0
        if not self.need_scores:
            if ban_eos:
                logits = self._ban_eos(logits.clone())
            if self.do_sample:
                return ops.sample(logits, **self.warp, repetition_penalty=self.penalty,
                                  seen_tokens=seen if penalised else None,
                                  backend=self.backend), None
            if penalised:
                logits = ops.apply_repetition_penalty(logits, seen, self.penalty,
                                                      backend=self.backend)
            return logits.argmax(-1), None
        scores = (ops.apply_repetition_penalty(logits, seen, self.penalty, backend=self.backend)
                  if penalised else logits.clone())
        if ban_eos:
            scores = self._ban_eos(scores)
        for processor in self.user:
            scores = processor(sequences, scores)
        if not self.do_sample:
            return scores.argmax(-1), scores
        scores = ops.process_logits(scores, **self.warp, backend=self.backend)
        return ops.sample(scores, backend=self.backend), scores

    def _ban_eos(self, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.eos] = float("-inf")
        return scores
