"""The decoding loop of ``fastdecode.generate``: prefill, then one token per row per step.

Buffers grow with the tokens (the ids so far, the repetition penalty's ids), so that a huge
``max_new_tokens`` costs memory only for the tokens actually produced. One host sync per step
decides whether to go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fastdecode.hf import compat
from fastdecode.hf.options import Options
from fastdecode.hf.sampling import TokenSelector


class GrowingRows:
    """A [B, n] tensor that grows along dim 1, doubling its storage when full.

    initial: [B, L] first columns; fill: value of columns not written yet; limit: the most columns
    it will ever need (storage never exceeds it).
    """

    def __init__(self, initial: torch.Tensor, fill: int, limit: int):
        self.fill, self.limit = fill, limit
        self.length = initial.shape[1]
        width = min(limit, max(self.length + 16, 2 * self.length))
        self.storage = initial.new_full((initial.shape[0], width), fill)
        self.storage[:, :self.length] = initial

    def append(self, column: torch.Tensor) -> None:
        if self.length == self.storage.shape[1]:
            width = min(self.limit, 2 * self.storage.shape[1])
            grown = self.storage.new_full((self.storage.shape[0], width), self.fill)
            grown[:, :self.length] = self.storage
            self.storage = grown
        self.storage[:, self.length] = column
        self.length += 1

    @property
    def view(self) -> torch.Tensor:
        """[B, length]: the columns written so far (a view, valid until the next append)."""
        return self.storage[:, :self.length]


@dataclass
class LoopResult:
    """sequences: [B, L + new]; scores / logits: per step [B, V] float32 (when asked);
    hidden_states: per step, the model's tuple of per-layer states (when asked)."""

    sequences: torch.Tensor
    scores: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    hidden_states: list = field(default_factory=list)


def _penalty_ids(input_ids: torch.Tensor, mask: Optional[torch.Tensor], vocab: int) -> torch.Tensor:
    """The prompt's ids as the repetition penalty sees them: -1 where HF ignores a column (ids
    outside the vocabulary; the mask's leading zeros where this release skips them)."""
    seen = torch.where((input_ids >= 0) & (input_ids < vocab), input_ids, -1)
    if mask is not None and compat.penalty_skips_padding() and seen.shape[1]:
        first = (mask != 0).int().argmax(dim=1)  # HF's prompt_ignore_length
        columns = torch.arange(seen.shape[1], device=seen.device)
        seen = seen.masked_fill(columns[None, :] < first[:, None], -1)
    return seen


def run(stepper, selector: TokenSelector, opts: Options, streamer, input_ids: torch.Tensor,
        penalty_mask: Optional[torch.Tensor]) -> LoopResult:
    """input_ids: [B, L] (L may be 0); penalty_mask: the attention mask HF's repetition penalty
    reads its ``prompt_ignore_length`` from (None: skip nothing)."""
    batch, length = input_ids.shape
    device = input_ids.device
    limit = length + opts.max_new_tokens
    pad = opts.pad if opts.pad is not None else 0
    ids = GrowingRows(input_ids, pad, limit)
    seen: Optional[GrowingRows] = None
    eos = torch.tensor(opts.eos, device=device) if opts.eos else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    keep_scores = opts.return_dict and opts.output_scores
    result = LoopResult(sequences=input_ids)
    logits = stepper.prefill()
    if opts.repetition_penalty != 1.0:
        seen = GrowingRows(_penalty_ids(input_ids, penalty_mask, logits.shape[-1]), -1, limit)
    while True:
        tokens, scores = selector(logits.to(device), ids.view,
                                  seen.view if seen is not None else None,
                                  ban_eos=eos is not None and ids.length < opts.min_length)
        if keep_scores:
            result.scores.append(scores)
        if opts.return_dict and opts.output_logits:
            result.logits.append(logits)
        if opts.return_dict and opts.output_hidden_states:
            result.hidden_states.append(stepper.hidden_states)
        invalid = (tokens < 0).any()
        if eos is not None:  # finished rows get padding, as in HF
            tokens = torch.where(unfinished, tokens, pad)
        ids.append(tokens)
        if seen is not None:
            seen.append(tokens)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
        if opts.criteria:
            done = torch.zeros_like(unfinished)
            recorded = tuple(result.scores) if keep_scores else None
            for criterion in opts.criteria:  # a criterion may return a Python bool, as in HF
                done = done | criterion(ids.view, recorded)
            unfinished &= ~done
        running, bad = torch.stack([unfinished.any(), invalid]).tolist()  # the one host sync
        if bad:
            raise ValueError("sampling found no valid token (NaN logits, or every token "
                             "filtered out) in at least one row")
        if not running or ids.length >= opts.max_length:
            result.sequences = ids.view
            return result
        logits = stepper.decode(tokens, ids.view)
