"""no_repeat_ngram_size and bad_words_ids as Engine SamplingParams: same tokens as
model.generate's processors (greedy), per request, and checked at construction."""

from __future__ import annotations

import pytest
import torch

from fastdecode import Engine, SamplingParams
from tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _hf(model, prompt, **kwargs):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                         eos_token_id=None, **kwargs)
    return out[0, len(prompt):].tolist()


def test_requests_with_their_own_masks_match_hf(llama):
    prompts = [[5, 9, 14, 9, 33, 5], [40, 41, 42], [7] * 9]
    first = _hf(llama, prompts[1])
    bad = ((first[0], first[1]), (first[2],))  # a pair and a single token of the plain output
    settings = [dict(no_repeat_ngram_size=2), dict(bad_words_ids=bad),
                dict(no_repeat_ngram_size=3, bad_words_ids=bad)]
    engine = Engine(llama, num_blocks=64)
    params = [SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, **s)
              for s in settings]
    outs = engine.generate(prompts, params)
    for prompt, s, out in zip(prompts, settings, outs):
        hf_kwargs = dict(s)
        if "bad_words_ids" in hf_kwargs:
            hf_kwargs["bad_words_ids"] = [list(w) for w in bad]
        assert out.output_ids == _hf(llama, prompt, **hf_kwargs), s
    assert outs[1].output_ids[:2] != first[:2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"),
    (dict(bad_words_ids=[[1, -2]]), "bad_words_ids"),
    (dict(bad_words_ids=5), "bad_words_ids"),
])
def test_invalid_mask_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_words_outside_the_vocabulary_are_refused(llama):
    engine = Engine(llama, num_blocks=8)
    with pytest.raises(ValueError, match="bad_words_ids"):
        engine.add_request([3, 4], SamplingParams(bad_words_ids=[[3, 10_000]]))
