"""What speculative decoding shares between :func:`fastdecode.generate` and the Engine (torch
only, no transformers): the prompt-lookup draft and the acceptance of a deterministic draft.

A deterministic drafter proposes ``d_1 .. d_k`` (a point mass ``q = onehot(d)`` at each
position). The rejection scheme keeps ``d_j`` with probability ``min(1, p(d_j) / q(d_j)) =
p(d_j)`` and otherwise draws from ``max(p - q, 0)`` renormalised, which is ``p`` without
``d_j``. Drawing ``x_j ~ p`` at every position and keeping ``d_j`` while ``x_j == d_j`` does
the same: ``d_j`` is kept with probability ``p(d_j)``, and the first ``x_j != d_j`` is a draw
from ``p`` conditioned on not being ``d_j``. So the target's own draws (argmax when greedy)
decide, and :func:`accepted_prefix` is the whole verifier for such drafts.
"""

from __future__ import annotations

from typing import Collection

import torch


def lookup_draft(seq: list[int], max_ngram: int, limit: int, stop: Collection[int]) -> list[int]:
    """Up to ``limit`` tokens that followed an earlier occurrence of ``seq``'s last n-gram.

    As transformers' prompt lookup: for n from ``max_ngram`` down to 1, the first (leftmost)
    earlier occurrence of the last n tokens that has a continuation gives the draft, cut
    before a ``stop`` token. No match: an empty draft.
    """
    if limit <= 0:
        return []
    ids = torch.tensor(seq)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        windows = ids.unfold(0, n, 1)
        starts = (windows == ids[-n:]).all(1).nonzero()[:, 0] + n
        for start in starts.tolist():
            if start < len(seq):  # the last n-gram matches itself with nothing after it
                draft = seq[start:start + limit]
                cut = next((i for i, t in enumerate(draft) if t in stop), len(draft))
                if cut:
                    return draft[:cut]
    return []


def accepted_prefix(choice: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """choice: [B, K + 1] int64, the target's token after ``last, d_1 .. d_K`` (argmax, or a
    draw from its distribution); drafts: [B, K] int64 (columns past a row's length ignored);
    lengths: [B] int64 draft tokens of each row.

    Returns (accepted [B] int64 drafts kept: those equal to the target's choice before them,
    next [B] int64 the target's choice after them).
    """
    width = drafts.shape[1]
    valid = torch.arange(width, device=drafts.device)[None, :] < lengths[:, None]
    kept = (choice[:, :width] == drafts) & valid
    accepted = kept.int().cumprod(1).sum(1)
    return accepted, choice.gather(1, accepted[:, None].long())[:, 0]
