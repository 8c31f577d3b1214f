"""HF's ``no_repeat_ngram_size`` as one batched device operation (torch only, no transformers).

A row may not produce a token that would repeat an n-gram already in its history: for every
window of n tokens whose first n - 1 tokens equal the row's last n - 1 tokens, the window's last
token is banned. All windows of all rows are compared at once (``unfold``), so there is no Python
loop over the history and no host sync.
"""

from __future__ import annotations

import torch


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """scores: [B, V] float (not modified); history: [B, L] int64 ids so far, padding included as
    HF's processor sees it; ngram_size n >= 1 -> [B, V], banned tokens set to -inf (overwritten,
    as HF does, so a NaN score at a banned token becomes -inf)."""
    if ngram_size < 1:
        raise ValueError(f"no_repeat_ngram_size must be a positive integer, got {ngram_size}")
    batch, length = history.shape
    vocab = scores.shape[-1]
    if length < ngram_size:  # no complete n-gram yet
        return scores
    windows = history.unfold(1, ngram_size, 1)  # [B, L - n + 1, n]
    suffix = history[:, length - ngram_size + 1:]  # [B, n - 1]
    match = (windows[..., :-1] == suffix[:, None, :]).all(-1)  # [B, L - n + 1]
    targets = windows[..., -1]
    # Unmatched windows (and ids outside the vocabulary) point at a spare column that is dropped.
    valid = match & (targets >= 0) & (targets < vocab)
    banned = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(valid, targets, vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))
