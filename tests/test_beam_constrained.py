"""Constrained beam search (force_words_ids, constraints) against the independent reference of
transformers 4.5x's algorithm in tests/constrained_reference.py (transformers 5 only runs it as
remote code), on the paged path (the original generate must not run)."""

from __future__ import annotations

import random

import pytest
import torch

import fastdecode
from _beam_helpers import assert_matches_reference, eos_on_the_way
from _hf_helpers import RecordingStreamer, fd_generate, forbid_original_generate, padded_batch
from constrained_reference import _progress, constrained_beam_search
from fastdecode.hf import compat
from fastdecode.hf.constraints import Constraints
from tiny import tiny_model

# Words are drawn from the prompts' id range; a disjunctive entry branches after its first token.
CASES = {
    "phrase": dict(force=[[50, 60]], num_beams=4, max_new_tokens=9, num_return_sequences=2),
    "words": dict(force=[[33], [[70, 71, 72], [70, 80], [90]], [101, 102]], num_beams=5,
                  max_new_tokens=12, num_return_sequences=3, length_penalty=0.6),
    "penalties": dict(force=[[[7, 8], [9]], [12, 12, 13]], num_beams=3, max_new_tokens=10,
                      no_repeat_ngram_size=2, repetition_penalty=1.3, length_penalty=-0.4),
    "too_short": dict(force=[[41, 42, 43]], num_beams=3, max_new_tokens=2,
                      num_return_sequences=3),
}


@pytest.fixture(autouse=True)
def _paged_only(monkeypatch):
    forbid_original_generate(monkeypatch)


def _as_words(force):
    return [w if isinstance(w[0], list) else [w] for w in force]


def _compare(model, lengths, seed, force, eos=None, **options):
    ids, mask = padded_batch(lengths, model.config.vocab_size, seed=seed)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    expected, scores, gaps = constrained_beam_search(model, prompts, _as_words(force), pad=0,
                                                     eos=eos, **options)
    out = fd_generate(model, ids, attention_mask=mask, fallback="error", pad_token_id=0,
                      eos_token_id=eos, return_dict_in_generate=True, output_scores=True,
                      force_words_ids=force, **options)
    assert_matches_reference(out, expected, scores, gaps, rtol=1e-5)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [[7], [6, 2, 9]])
def test_constrained_beams_match_the_reference(family, case, lengths):
    options = dict(CASES[case])
    out = _compare(tiny_model(family), lengths, len(lengths), options.pop("force"), **options)
    steps = out.sequences.shape[1] - max(lengths)
    assert len(out.scores) >= steps and out.beam_indices.shape == (out.sequences.shape[0], steps)
    # 4.5x returned the summed scores: the first step's other beams carry the -1e9 start.
    first = out.scores[0].view(len(lengths), options["num_beams"], -1)
    assert (first[:, 1:] < -1e8).all() and (first[:, 0] > -1e8).any(-1).all()


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_constrained_beams_with_eos(early_stopping):
    assert compat.penalty_skips_padding(), "the reference skips left padding in the penalty"
    model = tiny_model("llama")
    eos = eos_on_the_way(model, [5, 8], seed=12)
    _compare(model, [5, 8], seed=12, force=[[20, 21], [[30], [40, 41]]], eos=eos, num_beams=4,
             max_new_tokens=12, early_stopping=early_stopping, length_penalty=0.8,
             num_return_sequences=2, repetition_penalty=1.2)


def _contains(row: list[int], word: list[int]) -> bool:
    return any(row[i:i + len(word)] == word for i in range(len(row) - len(word) + 1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("force", [[[50, 60]], [[[70, 71], [80, 81]]]])
@pytest.mark.parametrize("returned", [1, 2])
def test_every_output_holds_the_forced_words(family, force, returned):
    """4.5x's own regime: a budget of one token more than the words, 4 beams per output. (With
    longer budgets 4.5x, and fastdecode, may lose a completed beam to better-scoring ones.)"""
    model = tiny_model(family)
    ids, mask = padded_batch([6, 3, 10], model.config.vocab_size, seed=4)
    kwargs = dict(attention_mask=mask, num_beams=4 * returned, max_new_tokens=3,
                  num_return_sequences=returned, fallback="error")
    out = fd_generate(model, ids, force_words_ids=force, **kwargs)
    for row in out[:, ids.shape[1]:].tolist():
        assert all(any(_contains(row, w) for w in words) for words in _as_words(force)), row
    plain = fd_generate(model, ids, **kwargs)
    assert not torch.equal(plain, out)


def test_constraint_objects_and_lists_agree():
    model = tiny_model("llama")
    ids, mask = padded_batch([5, 9], model.config.vocab_size, seed=2)
    kwargs = dict(attention_mask=mask, num_beams=3, max_new_tokens=8, fallback="error")
    force = fd_generate(model, ids, force_words_ids=[[15, 16], [[25], [35, 36]]], **kwargs)

    class PhrasalConstraint:  # the shape of the hub repository's class
        def __init__(self, token_ids):
            self.token_ids = token_ids

    for constraints in ([fastdecode.PhrasalConstraint([15, 16]),
                         fastdecode.DisjunctiveConstraint([[25], [35, 36]])],
                        [PhrasalConstraint([15, 16]), [[25], [35, 36]]]):
        assert torch.equal(fd_generate(model, ids, constraints=constraints, **kwargs), force)
    # 4.5x put constraints= before force_words_ids=: the pending order decides which starts.
    both = fd_generate(model, ids, constraints=[[15, 16]], force_words_ids=[[[25], [35, 36]]],
                       **kwargs)
    assert torch.equal(both, force)


def test_progress_matches_the_reference_automaton():
    """Random rows over a small alphabet, so that words start, break and restart often."""
    constraints = [[[5, 5, 6]], [[5, 7], [6, 8, 9], [6, 9]], [[7]]]
    table = Constraints(constraints, "cpu")
    rng = random.Random(0)
    rows = [[rng.choice([5, 6, 7, 8, 9, 10]) for _ in range(12)] for _ in range(300)]
    ids = torch.tensor(rows)
    for n in range(ids.shape[1] + 1):
        state = table.start(ids[:, :n])
        proposed = table.advance(state)
        for r, row in enumerate(rows):
            expected = _progress(constraints, row[:n])
            assert bool(state.done()[r]) == expected.done()
            assert int(table.bank(state)[r]) == expected.bank()
            got = [t for t in proposed[r].tolist() if t >= 0]
            assert got == expected.advance(), (row[:n], got)
    # 4.5x never backtracks: the 5 that breaks "5 5 6" starts nothing.
    phrase = Constraints([[[5, 5, 6]]], "cpu")
    assert not phrase.start(torch.tensor([[5, 5, 5, 6]])).done().item()
    assert phrase.start(torch.tensor([[5, 5, 7, 5, 5, 6]])).done().item()


@pytest.mark.parametrize("options,message", [
    (dict(force_words_ids=[]), "force_words_ids"),
    (dict(force_words_ids=[[]]), "force_words_ids"),
    (dict(force_words_ids=[[-1, 4]]), "force_words_ids"),
    (dict(force_words_ids=[[4, "a"]]), "force_words_ids"),
    (dict(force_words_ids=[[[4, 5], [4, 5, 6]]]), "prefix"),
    (dict(force_words_ids=[[4, 500]]), r"force_words_ids: token id 500 is out of range \[0, 211\)"),
    (dict(constraints=[object()]), "constraints: unsupported constraint object"),
    (dict(force_words_ids=[[4]], do_sample=True), "do_sample"),
    (dict(force_words_ids=[[4]], num_beam_groups=2, diversity_penalty=1.0), "num_beam_groups"),
    (dict(force_words_ids=[[4]], num_beams=1), "num_beams > 1"),
    (dict(force_words_ids=[[4]], streamer=RecordingStreamer()), "streaming"),
])
def test_invalid_constraint_options_raise(options, message):
    model = tiny_model("llama")
    ids, mask = padded_batch([4], model.config.vocab_size, seed=1)
    options = {"num_beams": 2, **options}
    with pytest.raises(ValueError, match=message):
        fd_generate(model, ids, attention_mask=mask, max_new_tokens=3, **options)


@pytest.mark.parametrize("words,message", [
    ([], "PhrasalConstraint"), ([3, -2], "PhrasalConstraint"),
    ([[3]], "PhrasalConstraint"),
])
def test_invalid_phrasal_constraint(words, message):
    with pytest.raises(ValueError, match=message):
        fastdecode.PhrasalConstraint(words)


@pytest.mark.parametrize("words", [[], [[]], [[3], [3]], [[3, 4], [3]], [3, 4]])
def test_invalid_disjunctive_constraint(words):
    with pytest.raises(ValueError, match="DisjunctiveConstraint"):
        fastdecode.DisjunctiveConstraint(words)
