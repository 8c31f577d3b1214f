"""Diverse (group) beam search against the independent reference of transformers 4.5x's
algorithm in tests/beam_reference.py (transformers 5 only runs it as remote code)."""

from __future__ import annotations

import pytest
import torch

from _beam_helpers import assert_matches_reference, eos_on_the_way
from _hf_helpers import RecordingStreamer, fd_generate, forbid_original_generate, padded_batch
from beam_reference import group_beam_search
from fastdecode.hf import compat
from tiny import tiny_model


@pytest.fixture(autouse=True)
def _paged_only(monkeypatch):
    forbid_original_generate(monkeypatch)


def _compare(model, lengths, seed, **options):
    ids, mask = padded_batch(lengths, model.config.vocab_size, seed=seed)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    expected, scores, gaps = group_beam_search(model, prompts, pad=0, **options)
    out = fd_generate(model, ids, attention_mask=mask, fallback="error", pad_token_id=0,
                      eos_token_id=options.pop("eos", None), return_dict_in_generate=True,
                      output_scores=True, do_sample=False, **options)
    assert_matches_reference(out, expected, scores, gaps)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("groups,beams,returned", [(2, 4, 4), (3, 3, 2), (2, 6, 3)])
def test_diverse_beams_match_the_reference(family, groups, beams, returned):
    model = tiny_model(family)
    out = _compare(model, [6, 2, 9], seed=groups, num_beams=beams, num_beam_groups=groups,
                   diversity_penalty=1.5, max_new_tokens=7, num_return_sequences=returned)
    assert out.sequences.shape[1] == 9 + 7


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_diverse_beams_with_eos_and_processors(early_stopping):
    assert compat.penalty_skips_padding(), "the reference skips left padding in the penalty"
    model = tiny_model("llama")
    eos = eos_on_the_way(model, [5, 8], seed=12)
    _compare(model, [5, 8], seed=12, num_beams=4, num_beam_groups=2, diversity_penalty=0.7,
             max_new_tokens=10, eos=eos, early_stopping=early_stopping, length_penalty=0.8,
             num_return_sequences=3, repetition_penalty=1.3, no_repeat_ngram_size=2)


def test_diversity_changes_the_beams():
    model = tiny_model("qwen2")
    ids, mask = padded_batch([7], model.config.vocab_size, seed=3)
    kwargs = dict(attention_mask=mask, num_beams=4, max_new_tokens=6, num_return_sequences=4,
                  do_sample=False, fallback="error")
    plain = fd_generate(model, ids, **kwargs)
    diverse = fd_generate(model, ids, num_beam_groups=4, diversity_penalty=5.0, **kwargs)
    first = diverse[:, ids.shape[1]]
    assert len(set(first.tolist())) == 4  # each group avoids the others' first token
    assert not torch.equal(plain, diverse)


@pytest.mark.parametrize("options,message", [
    (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "multiple"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.0), "diversity_penalty"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, do_sample=True), "do_sample"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, streamer=RecordingStreamer()),
     "streaming"),
])
def test_invalid_group_options_raise(options, message):
    model = tiny_model("llama")
    ids, mask = padded_batch([4], model.config.vocab_size, seed=1)
    with pytest.raises(ValueError, match=message):
        fd_generate(model, ids, attention_mask=mask, max_new_tokens=3, **options)
