"""Beam search and beam sampling of fastdecode.generate against model.generate (float32,
random weights), on the paged path (the original generate must not run)."""

from __future__ import annotations

import pytest
import torch

from _beam_helpers import assert_beams_match
from _hf_helpers import RecordingStreamer, fd_generate, forbid_original_generate, padded_batch
from tiny import tiny_model

FAMILIES = ["llama", "qwen2", "gpt2", "opt"]
CASES = {
    "plain": dict(num_beams=4, max_new_tokens=9),
    "early": dict(num_beams=3, max_new_tokens=8, early_stopping=True, num_return_sequences=2,
                  length_penalty=0.5),
    "never": dict(num_beams=5, max_new_tokens=7, early_stopping="never", length_penalty=1.7,
                  num_return_sequences=5),
    "penalties": dict(num_beams=3, max_new_tokens=8, no_repeat_ngram_size=2,
                      repetition_penalty=1.4, length_penalty=-0.5),
}


@pytest.fixture(autouse=True)
def _paged_only(monkeypatch):
    forbid_original_generate(monkeypatch)


# Every family meets every case; single and left-padded batches alternate along the pairs.
PAIRS = [(f, c, [7] if (i + j) % 2 else [5, 11, 2])
         for i, f in enumerate(FAMILIES) for j, c in enumerate(CASES)]


@pytest.mark.parametrize("family,case,lengths", PAIRS)
def test_beam_search_matches_hf(family, case, lengths, monkeypatch):
    model = tiny_model(family)
    ids, mask = padded_batch(lengths, model.config.vocab_size, seed=len(lengths))
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, do_sample=False,
                       **CASES[case])


def _eos_ids(model, ids, mask, count: int) -> list[int]:
    """Ids HF's best beam produces early (so that hypotheses end mid-way)."""
    plain = model.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=6,
                           do_sample=False, eos_token_id=None)
    return [int(t) for t in plain[0, ids.shape[1] + 2:ids.shape[1] + 2 + count]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("num_eos", [1, 2])
def test_eos_ends_hypotheses_like_hf(family, early_stopping, num_eos, monkeypatch):
    model = tiny_model(family)
    ids, mask = padded_batch([6, 3, 9], model.config.vocab_size, seed=3)
    eos = _eos_ids(model, ids, mask, num_eos)
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, num_beams=4,
                       max_new_tokens=12, eos_token_id=eos, pad_token_id=1,
                       early_stopping=early_stopping, num_return_sequences=3, do_sample=False)


def test_min_new_tokens_and_max_length(monkeypatch):
    model = tiny_model("qwen2")
    ids, mask = padded_batch([4, 8], model.config.vocab_size, seed=5)
    eos = _eos_ids(model, ids, mask, 1)
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, num_beams=3,
                       min_new_tokens=5, max_length=ids.shape[1] + 9, eos_token_id=eos,
                       do_sample=False)


def test_plain_tensor_output_and_logits(monkeypatch):
    model = tiny_model("llama")
    ids, mask = padded_batch([6, 4], model.config.vocab_size, seed=2)
    kwargs = dict(attention_mask=mask, num_beams=3, max_new_tokens=6, num_return_sequences=2)
    ref = model.generate(ids, **kwargs)
    assert torch.equal(fd_generate(model, ids, fallback="error", **kwargs), ref)
    ref = model.generate(ids, **kwargs, return_dict_in_generate=True, output_logits=True)
    out = fd_generate(model, ids, fallback="error", **kwargs, return_dict_in_generate=True,
                      output_logits=True)
    assert out.sequences_scores is None and ref.sequences_scores is None
    assert len(out.logits) == len(ref.logits)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert type(out.cache) is type(ref.cache)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(out.cache.layers[layer].keys, ref.cache.layers[layer].keys,
                                   rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("warpers", [{}, dict(top_k=7, top_p=0.8, temperature=0.7, min_p=0.05)],
                         ids=["plain", "warped"])
def test_beam_sampling_with_a_seed_matches_hf(family, warpers, monkeypatch):
    model = tiny_model(family)
    ids, mask = padded_batch([5, 9, 3], model.config.vocab_size, seed=1)
    for seed in range(2):
        assert_beams_match(model, monkeypatch, ids, attention_mask=mask, num_beams=3,
                           max_new_tokens=8, do_sample=True, num_return_sequences=2, seed=seed,
                           **warpers)


def test_right_padded_beams_within_a_sliding_window_fall_back_with_a_warning(monkeypatch):
    monkeypatch.undo()  # the original generate may run here
    model = tiny_model("mistral")
    ids, mask = padded_batch([6, 3], model.config.vocab_size, seed=4)
    ids, mask = ids.flip(1), mask.flip(1)  # right padding: HF's window counts the pads
    kwargs = dict(attention_mask=mask, num_beams=2, max_new_tokens=4)
    assert ids.shape[1] + 4 > model.config.sliding_window
    with pytest.warns(UserWarning, match="num_beams"):
        out = fd_generate(model, ids, **kwargs)
    assert torch.equal(out, model.generate(ids, **kwargs))


def test_beam_sampling_streams_the_prompt_only_like_hf():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    calls = []
    for run in (model.generate, lambda *a, **k: fd_generate(model, *a, fallback="error", **k)):
        streamer = RecordingStreamer()
        run(ids, num_beams=2, do_sample=True, max_new_tokens=3, streamer=streamer)
        calls.append([(kind, None if v is None else v.tolist()) for kind, v in streamer.calls])
    assert calls[0] == calls[1] and len(calls[0]) >= 1


def test_beams_from_inputs_embeds(monkeypatch):
    model = tiny_model("qwen2")
    ids, mask = padded_batch([5, 8], model.config.vocab_size, seed=3)
    embeds = model.get_input_embeddings()(ids).detach()
    assert_beams_match(model, monkeypatch, inputs_embeds=embeds, attention_mask=mask,
                       num_beams=3, max_new_tokens=6, num_return_sequences=2, do_sample=False)
