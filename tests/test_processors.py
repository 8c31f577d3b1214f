"""fastdecode.processors against transformers' own processors on random histories and scores."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import InfNanRemoveLogitsProcessor, NoBadWordsLogitsProcessor

from fastdecode.hf import compat
from fastdecode.processors import BannedSequences, remove_invalid_values

V = 37


def _history(batch: int, length: int, seed: int) -> torch.Tensor:
    """Ids from a small alphabet, so that banned prefixes occur often."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 6, (batch, length), generator=g)


SEQUENCES = [[[4]], [[1, 0]], [[2, 3, 1], [5], [0, 0], [1, 2, 3, 4, 5]], [[3, 3], [3, 3, 3], [7]]]


@pytest.mark.parametrize("sequences", SEQUENCES, ids=lambda s: str(s))
@pytest.mark.parametrize("length", [0, 1, 2, 5], ids=lambda n: f"L{n}")
def test_banned_sequences_match_hf(sequences, length):
    history = _history(9, length, seed=length)
    scores = torch.randn(9, V, generator=torch.Generator().manual_seed(1))
    banned = BannedSequences(sequences, V,
                             whole_sequence_in_history=compat.bad_words_need_whole_sequence())
    ours = banned(scores, history)
    ref = NoBadWordsLogitsProcessor(sequences)(history, scores.clone())
    assert torch.equal(ours, ref)
    assert torch.isinf(ours).any() or length < 2  # something was banned


def test_banned_sequences_keep_hf_arithmetic_and_padding():
    history = torch.tensor([[1, 1], [-1, 1]])  # row 1 is one token, left-padded with -1
    scores = torch.zeros(2, V)
    scores[0, 0], scores[1, 0] = float("inf"), float("nan")
    ours = BannedSequences([[1, 0], [1, 1, 2]], V)(scores, history)
    assert torch.isnan(ours[:, 0]).all()  # +inf + -inf and NaN + -inf are NaN, as in HF
    assert ours[0, 2] == float("-inf") and ours[1, 2] == 0  # row 1 has no [1, 1] prefix
    with pytest.raises(ValueError, match="vocabulary size"):
        BannedSequences([[V]], V)
    with pytest.raises(ValueError):
        BannedSequences([[]], V)


def test_remove_invalid_values_matches_hf():
    scores = torch.randn(4, V)
    scores[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    scores[2, 5] = float("nan")
    ref = InfNanRemoveLogitsProcessor()(None, scores.clone())
    assert torch.equal(remove_invalid_values(scores), ref)
    assert torch.isfinite(remove_invalid_values(scores)).all()


@pytest.mark.parametrize("whole", [False, True])
def test_banned_sequence_history_rule(whole):
    """A 2-token sequence on a 1-token history: banned with the prefix rule only."""
    scores = torch.zeros(1, V)
    out = BannedSequences([[3, 5]], V, whole_sequence_in_history=whole)(scores,
                                                                       torch.tensor([[3]]))
    assert (out[0, 5] == 0) == whole
