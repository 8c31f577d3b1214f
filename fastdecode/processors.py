"""Logits masks shared by ``fastdecode.generate`` and the Engine (torch only, no transformers).

Both are batched device-side operations: no host sync, no Python loop over the history.

- :class:`BannedSequences`: HF's ``bad_words_ids``. A single banned token is always forbidden; the
  last token of a longer banned sequence is forbidden when the history ends with the rest of it.
- :func:`remove_invalid_values`: HF's ``remove_invalid_values`` (NaN -> 0, +-inf -> the largest
  finite values of the dtype).
"""

from __future__ import annotations

from typing import Sequence

import torch

_NO_TOKEN = -1  # history padding, and prefix positions that match anything


class BannedSequences:
    """Forbids token sequences: ``scores + bias`` with ``bias = -inf`` at the banned next tokens.

    sequences: non-empty lists of token ids >= 0. Adding ``-inf`` (rather than overwriting) keeps
    HF's arithmetic: a NaN score stays NaN and ``+inf`` becomes NaN, exactly as in HF's processor.
    whole_sequence_in_history: a sequence of n tokens applies only once the history holds n tokens
    (older transformers releases), rather than its n - 1 prefix tokens.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu", whole_sequence_in_history: bool = False):
        sequences = [tuple(int(t) for t in s) for s in sequences]
        if not sequences or any(len(s) == 0 or min(s) < 0 for s in sequences):
            raise ValueError("banned sequences must be non-empty lists of token ids >= 0, got "
                             f"{sequences}")
        invalid = sorted({t for s in sequences for t in s if t >= vocab_size})
        if invalid:
            raise ValueError(f"The model vocabulary size is {vocab_size}, but the following tokens "
                             f"were being biased: {invalid}")
        self.vocab_size = vocab_size
        single = sorted({s[0] for s in sequences if len(s) == 1})
        self.single_bias = torch.zeros(vocab_size, device=device)
        self.single_bias[single] = float("-inf")
        longer = sorted({s for s in sequences if len(s) > 1})
        width = max((len(s) - 1 for s in longer), default=0)
        # prefixes: [S, K] right-aligned, _NO_TOKEN to the left of shorter prefixes.
        self.prefixes = torch.tensor([[_NO_TOKEN] * (width - len(s) + 1) + list(s[:-1])
                                      for s in longer], dtype=torch.long,
                                     device=device).view(len(longer), width)
        self.wildcard = self.prefixes == _NO_TOKEN
        self.targets = torch.tensor([s[-1] for s in longer], dtype=torch.long, device=device)
        extra = 1 if whole_sequence_in_history else 0
        self.min_history = torch.tensor([len(s) - 1 + extra for s in longer], device=device)

    def bias(self, history: torch.Tensor) -> torch.Tensor:
        """history: [B, L] int64 ids so far, left-padded with -1 where rows are shorter (L may be
        0) -> bias [B, V] float32 (0 or -inf)."""
        batch = history.shape[0]
        bias = self.single_bias.expand(batch, -1).clone()
        width = self.prefixes.shape[1]
        if width == 0:
            return bias
        tail = history[:, -width:] if history.shape[1] else history.new_empty(batch, 0)
        if tail.shape[1] < width:  # a prefix longer than the history never matches
            tail = torch.nn.functional.pad(tail, (width - tail.shape[1], 0), value=_NO_TOKEN)
        match = ((tail[:, None, :] == self.prefixes[None]) | self.wildcard[None]).all(-1)
        lengths = (history != _NO_TOKEN).sum(-1)
        match &= lengths[:, None] >= self.min_history[None]
        minus_inf = torch.full_like(match, float("-inf"), dtype=bias.dtype)
        bias.scatter_add_(1, self.targets.expand(batch, -1),
                          torch.where(match, minus_inf, torch.zeros_like(minus_inf)))
        return bias

    def __call__(self, scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """scores: [B, V] float32 (not modified) -> [B, V] float32, banned tokens at -inf."""
        return scores + self.bias(history)


def remove_invalid_values(scores: torch.Tensor) -> torch.Tensor:
    """scores: [B, V] float -> same shape: NaN -> 0, +inf / -inf -> the dtype's max / min."""
    info = torch.finfo(scores.dtype)
    out = torch.where(scores != scores, 0.0, scores)
    out = torch.where(scores == float("inf"), info.max, out)
    return torch.where(scores == float("-inf"), info.min, out)
