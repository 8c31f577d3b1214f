"""no_repeat_ngram_size and (multi-token) bad_words_ids: the batched op against HF's processor,
and both options in greedy, sampling and beam decoding against model.generate."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, NoBadWordsLogitsProcessor,
                                                    NoRepeatNGramLogitsProcessor)

from _beam_helpers import assert_beams_match
from _hf_helpers import assert_greedy_match, fd_generate, forbid_original_generate, padded_batch
from tiny import tiny_model
from fastdecode.processors import block_repeated_ngrams


@pytest.fixture(autouse=True)
def _paged_only(monkeypatch):
    forbid_original_generate(monkeypatch)


@pytest.mark.parametrize("ngram_size", [1, 2, 3, 5])
@pytest.mark.parametrize("length", [0, 1, 2, 4, 17])
def test_ngram_ban_equals_hf_processor(ngram_size, length):
    g = torch.Generator().manual_seed(ngram_size * 100 + length)
    history = torch.randint(0, 4, (6, length), generator=g)  # few ids: many repeats
    scores = torch.randn(6, 9, generator=g)
    scores[0, 1], scores[1, 2], scores[2, 3] = float("nan"), float("inf"), float("-inf")
    expected = NoRepeatNGramLogitsProcessor(ngram_size)(history, scores.clone())
    got = block_repeated_ngrams(scores, history, ngram_size)
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
    assert not scores[:, 4:].isinf().any()  # the input is left as it was


def test_ngram_size_must_be_positive():
    with pytest.raises(ValueError, match="ngram_size"):
        block_repeated_ngrams(torch.zeros(1, 3), torch.zeros(1, 2, dtype=torch.long), 0)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _bad_words(model, ids, mask, **kwargs):
    """Multi-token bad words on what decoding produces: (1st, 2nd) and (2nd, 3rd) new tokens of
    row 0, so each second token is banned only right after the first."""
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                           **kwargs)[0, ids.shape[1]:].tolist()
    return [plain[:2], plain[1:3], [5]]


@pytest.mark.parametrize("ngram", [2, 3])
def test_greedy_ngram_and_bad_words_match_hf(llama, ngram):
    ids, mask = padded_batch([9, 4, 12], llama.config.vocab_size, seed=8)
    bad = _bad_words(llama, ids, mask)
    kwargs = dict(max_new_tokens=30, do_sample=False, no_repeat_ngram_size=ngram,
                  bad_words_ids=bad, return_dict_in_generate=True, output_scores=True)
    ref = llama.generate(ids, attention_mask=mask, **kwargs)
    out = fd_generate(llama, ids, attention_mask=mask, fallback="error", **kwargs)
    assert_greedy_match(ref, out.sequences, ids.shape[1])
    for ours, theirs in zip(out.scores, ref.scores):
        assert torch.equal(ours.isinf(), theirs.isinf())


def _repeats(row: list[int], n: int) -> bool:
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("output_scores", [False, True], ids=["fused", "scores"])
def test_sampling_ngram_and_bad_words_follow_hf_processors(llama, output_scores):
    """Draws differ from HF's (own RNG), so HF's processors are applied to fastdecode's own
    histories: the scores must agree, and no drawn token may be one they ban."""
    ids, mask = padded_batch([6, 10], llama.config.vocab_size, seed=9)
    bad = _bad_words(llama, ids, mask)
    hf = LogitsProcessorList([NoRepeatNGramLogitsProcessor(2),
                              NoBadWordsLogitsProcessor(bad, eos_token_id=None)])
    torch.manual_seed(0)
    out = fd_generate(llama, ids, attention_mask=mask, fallback="error", do_sample=True,
                      top_k=0, max_new_tokens=40, no_repeat_ngram_size=2, bad_words_ids=bad,
                      num_return_sequences=2, eos_token_id=None, return_dict_in_generate=True,
                      output_scores=output_scores, output_logits=True)
    length = ids.shape[1]
    for step, logits in enumerate(out.logits):
        history = out.sequences[:, :length + step]
        expected = hf(history, logits.clone())
        token = out.sequences[:, length + step]
        assert torch.isfinite(expected.gather(1, token[:, None])).all(), step
        if output_scores:
            assert torch.equal(out.scores[step].isinf(), expected.isinf())
    for row in out.sequences[:, length:].tolist():
        assert not _repeats(row, 2)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("sample", [False, True])
def test_beams_with_ngram_and_bad_words_match_hf(family, sample, monkeypatch):
    model = tiny_model(family)
    ids, mask = padded_batch([8, 3], model.config.vocab_size, seed=10)
    bad = _bad_words(model, ids, mask, num_beams=3)
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, num_beams=3,
                       max_new_tokens=16, no_repeat_ngram_size=2, bad_words_ids=bad,
                       num_return_sequences=2, do_sample=sample, seed=1 if sample else None)
