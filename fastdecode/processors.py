"""Logits masks shared by ``fastdecode.generate`` and the Engine (torch only, no transformers).

Both are batched device-side operations: no host sync, no Python loop over the history.

- :class:`BannedSequences`: HF's ``bad_words_ids``. A single banned token is always forbidden; the
  last token of a longer banned sequence is forbidden when the history ends with the rest of it.
- :func:`block_repeated_ngrams` / :func:`repeated_ngram_mask`: HF's ``no_repeat_ngram_size``. A
  token is forbidden when it would complete an n-gram that already occurs in the row's history.
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


def repeated_ngram_mask(history: torch.Tensor, ngram_size: int | Sequence[int],
                        vocab_size: int) -> torch.Tensor:
    """history: [B, L] int64 ids so far, left-padded with -1 where rows are shorter; ngram_size:
    n >= 1 for every row, or one n >= 0 per row (0 = off) -> banned [B, V] bool.

    Row b bans the last token of every n-gram of its history whose first n - 1 tokens equal the
    history's last n - 1 tokens (with n = 1: every token of the history), once the row holds n
    tokens. Ids outside [0, V) are never banned (as in HF, where they cannot be generated).

    Batched over the whole history: for each position e and each k = 1 .. N - 1 (N the largest
    n), compare token e - k with token L - k; a window matches when its row's first n - 1
    comparisons hold. Cost O(B * L * N), no host sync, no loop over the history.
    """
    batch, length = history.shape
    sizes = _ngram_sizes(ngram_size, batch)
    banned = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=history.device)
    if length == 0 or max(sizes, default=0) == 0:
        return banned[:, :vocab_size]
    span = max(sizes) - 1  # N - 1 comparisons
    n = torch.tensor(sizes, device=history.device)
    padded = torch.nn.functional.pad(history, (span, 0), value=_NO_TOKEN)
    # windows[b, e, j] = history[b, e - span + j]: the span tokens before e, then e itself.
    windows = padded.unfold(1, span + 1, 1)
    suffix = padded[:, padded.shape[1] - span:]  # suffix[b, j] = history[b, L - span + j]
    # Comparison j is k = span - j tokens back; row b uses k <= n_b - 1, i.e. j >= span - n_b + 1.
    needed = torch.arange(span, device=history.device)[None, :] >= (span + 1 - n)[:, None]
    match = ((windows[..., :span] == suffix[:, None, :]) | ~needed[:, None, :]).all(-1)
    lengths = (history >= 0).sum(-1)
    match &= ((n >= 1) & (lengths >= n))[:, None]
    last = windows[..., span]
    # Unmatched windows and ids outside the vocabulary go to a spare column past the vocab.
    spare = (~match) | (last < 0) | (last >= vocab_size)
    banned.scatter_(1, torch.where(spare, vocab_size, last), True)
    return banned[:, :vocab_size]


def block_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor,
                          ngram_size: int | Sequence[int]) -> torch.Tensor:
    """scores: [B, V] float (not modified), history: [B, L] int64 (-1 padded) -> [B, V] scores
    with the tokens of :func:`repeated_ngram_mask` set to -inf (overwritten, NaN included, as
    HF's ``NoRepeatNGramLogitsProcessor`` does)."""
    mask = repeated_ngram_mask(history, ngram_size, scores.shape[-1])
    return scores.masked_fill(mask, float("-inf"))


def _ngram_sizes(ngram_size: int | Sequence[int], batch: int) -> list[int]:
    """One n per row, checked on the host: an int >= 1 for every row, or a [B] sequence of ints
    >= 0 (0 = off)."""
    if isinstance(ngram_size, (bool, torch.Tensor)) or not isinstance(ngram_size,
                                                                       (int, Sequence)):
        raise TypeError(f"ngram_size must be an int or a sequence of ints, got {ngram_size!r}")
    if isinstance(ngram_size, int):
        if ngram_size < 1:
            raise ValueError(f"ngram_size must be an int >= 1, got {ngram_size}")
        return [ngram_size] * batch
    sizes = list(ngram_size)
    if len(sizes) != batch or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                  for v in sizes):
        raise ValueError(f"ngram_size must be {batch} ints >= 0 (one per row, 0 = off), got "
                         f"{sizes}")
    return sizes


def remove_invalid_values(scores: torch.Tensor) -> torch.Tensor:
    """scores: [B, V] float -> same shape: NaN -> 0, +inf / -inf -> the dtype's max / min."""
    info = torch.finfo(scores.dtype)
    out = torch.where(scores != scores, 0.0, scores)
    out = torch.where(scores == float("inf"), info.max, out)
    return torch.where(scores == float("-inf"), info.min, out)
