"""fastdecode.processors' n-gram blocking against the installed transformers'
NoRepeatNGramLogitsProcessor, row by row on random histories with many repeats."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import NoRepeatNGramLogitsProcessor

from fastdecode.processors import block_repeated_ngrams, repeated_ngram_mask

V = 23


def _history(batch: int, length: int, seed: int, alphabet: int = 4) -> torch.Tensor:
    """Ids from a small alphabet, so that n-grams repeat often."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, alphabet, (batch, length), generator=g)


def _scores(batch: int, seed: int) -> torch.Tensor:
    """Random scores with a NaN and infinities (HF overwrites banned entries, NaN included)."""
    scores = torch.randn(batch, V, generator=torch.Generator().manual_seed(seed))
    scores[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return scores


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("batch, length", [(1, 0), (3, 1), (17, 2), (3, 3), (5, 4), (2, 5),
                                           (17, 37), (3, 130)])
def test_matches_hf(n, batch, length):
    history = _history(batch, length, seed=31 * n + length)
    scores = _scores(batch, seed=length)
    ours = block_repeated_ngrams(scores, history, n)
    ref = NoRepeatNGramLogitsProcessor(n)(history, scores.clone())
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())
    if length > n + 3:
        assert (ours == float("-inf")).sum() > (scores == float("-inf")).sum()


def test_rows_of_different_lengths_and_sizes():
    """-1 left padding and one n per row (0 = off): each row as HF sees it alone."""
    lengths, sizes = [0, 1, 2, 9, 40, 40, 17, 3], [2, 1, 3, 4, 1, 3, 0, 2]
    width = max(lengths)
    rows = [_history(1, length, seed=i, alphabet=3)[0] for i, length in enumerate(lengths)]
    history = torch.full((len(rows), width), -1)
    for b, row in enumerate(rows):
        history[b, width - len(row):] = row
    scores = _scores(len(rows), seed=5)
    ours = block_repeated_ngrams(scores, history, sizes)
    for b, (row, n) in enumerate(zip(rows, sizes)):
        expected = scores[b:b + 1].clone()
        if n:
            expected = NoRepeatNGramLogitsProcessor(n)(row[None], expected)
        torch.testing.assert_close(ours[b:b + 1], expected, rtol=0, atol=0, equal_nan=True)
    assert repeated_ngram_mask(history, sizes, V)[4].sum() == len(set(rows[4].tolist()))


def test_ids_outside_the_vocabulary_are_not_banned():
    """A history id >= V (an embedding larger than the head) is skipped, as in HF."""
    history = torch.tensor([[V + 2, 5, V + 2, 5, V + 2]])
    scores = torch.zeros(1, V)
    for n in (1, 2, 3):
        ref = NoRepeatNGramLogitsProcessor(n)(history, scores.clone())
        assert torch.equal(block_repeated_ngrams(scores, history, n), ref)


def test_empty_batch_and_history():
    assert repeated_ngram_mask(torch.zeros(0, 5, dtype=torch.long), 2, V).shape == (0, V)
    assert not repeated_ngram_mask(torch.zeros(3, 0, dtype=torch.long), [1, 0, 2], V).any()


@pytest.mark.parametrize("size, error", [(0, ValueError), (-2, ValueError), (True, TypeError),
                                         (2.0, TypeError), ([2, 2], ValueError),
                                         ([2, -1, 2], ValueError), (torch.tensor(2), TypeError)])
def test_bad_ngram_size(size, error):
    with pytest.raises(error, match="ngram_size"):
        repeated_ngram_mask(_history(3, 6, seed=0), size, V)
