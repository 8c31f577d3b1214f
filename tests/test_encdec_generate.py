"""fastdecode.generate on encoder-decoder models (T5, Flan-T5, BART, Marian): the encoder once,
the decoder on paged caches; same tokens and scores as ``model.generate`` (float32)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import EncoderDecoderCache

from _beam_helpers import assert_beams_match
from _hf_helpers import assert_greedy_match, count_paged_calls, fd_generate, forbid_original_generate
from fastdecode.hf.generate import FallbackError
from fastdecode.hf.seq2seq import _relative_bias
from tiny import SEQ2SEQ, tiny_seq2seq

_MODELS: dict = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_seq2seq(family)
    return _MODELS[family]


def _batch(rows: int, width: int, seed: int, holes: bool = True):
    """(encoder ids [rows, width], mask): row 1 right-padded, row 2 left-padded, row 3 with a
    hole (when asked): every padding layout HF's encoder mask allows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[1, width - 3:] = 0
    if rows > 2:
        mask[2, :2] = 0
    if rows > 3 and holes:
        mask[3, 3:5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _assert_same(model, ids, monkeypatch, **kwargs):
    """fastdecode's greedy run equals HF's (tokens; scores where the tokens agree)."""
    forbid_original_generate(monkeypatch)
    kwargs = dict(kwargs, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ref = model.generate(ids, **kwargs)
    ours = fd_generate(model, ids, fallback="error", **kwargs)
    start = ref.sequences.shape[1] - len(ref.scores)
    ties = assert_greedy_match(ref, ours.sequences, start)
    if not ties:
        assert len(ours.scores) == len(ref.scores)
        for a, b in zip(ours.scores, ref.scores):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    return ref, ours


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_greedy_batched_with_encoder_padding(family, monkeypatch):
    model = _model(family)
    ids, mask = _batch(4, 11, seed=1)
    with count_paged_calls(monkeypatch) as counts:
        ref, ours = _assert_same(model, ids, monkeypatch, attention_mask=mask, max_new_tokens=33)
    # every decoder layer's self- and cross-attention went to the paged caches, every step
    steps = len(ref.scores)
    layers = getattr(model.config, "num_decoder_layers", None) or model.config.decoder_layers
    assert counts["paged_attention"] == 2 * layers * steps
    assert type(ours).__name__ == type(ref).__name__
    assert ours.encoder_hidden_states is None and ours.encoder_attentions is None


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_single_prompt_and_plain_tensor_output(family):
    model = _model(family)
    ids, _ = _batch(1, 7, seed=2)
    ref = model.generate(ids, max_new_tokens=25, do_sample=False)
    ours = fd_generate(model, ids, max_new_tokens=25, do_sample=False, fallback="error")
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", ["flan_t5", "bart"])
def test_decoder_input_ids(family, monkeypatch):
    model = _model(family)
    ids, mask = _batch(3, 9, seed=3)
    start = model.generation_config.decoder_start_token_id
    prefix = torch.tensor([[start, 17, 40, 9], [start, 5, 5, 60], [start, 100, 3, 21]])
    _assert_same(model, ids, monkeypatch, attention_mask=mask, decoder_input_ids=prefix,
                 max_new_tokens=20)


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_encoder_outputs_passed_in(family, monkeypatch):
    model = _model(family)
    ids, mask = _batch(3, 10, seed=4)
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    _assert_same(model, None, monkeypatch, encoder_outputs=encoded, attention_mask=mask,
                 max_new_tokens=18)


def test_relative_bias_table_equals_t5_bias_beyond_max_distance():
    """The [Hq, 2R + 1] table read at j - i gives T5's own bias, also past R (saturation)."""
    attention = _model("flan_t5").get_decoder().block[0].layer[0].SelfAttention
    radius = attention.relative_attention_max_distance
    length = 3 * radius + 5
    with torch.no_grad():
        dense = attention.compute_bias(length, length)[0].double()  # [H, i, j]
        table = _relative_bias(attention).double()
    i, j = torch.tril_indices(length, length)  # the causal part the op reads
    from_table = table[:, radius + (j - i).clamp(-radius, radius)]
    torch.testing.assert_close(from_table, dense[:, i, j], rtol=0, atol=0)


def test_returned_cache_holds_hf_keys(monkeypatch):
    """return_dict_in_generate: HF's EncoderDecoderCache, the decoder's keys as HF's and the
    encoder's at the mask's columns."""
    model = _model("bart")
    ids, mask = _batch(3, 9, seed=6)
    ref, ours = _assert_same(model, ids, monkeypatch, attention_mask=mask, max_new_tokens=10)
    assert isinstance(ours.past_key_values, EncoderDecoderCache)
    for mine, theirs in ((ours.past_key_values.self_attention_cache,
                          ref.past_key_values.self_attention_cache),):
        for a, b in zip(mine.layers, theirs.layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
    cross, hf_cross = (c.cross_attention_cache.layers[0] for c in (ours.past_key_values,
                                                                  ref.past_key_values))
    keep = mask.bool()[:, None, :, None].expand_as(hf_cross.keys)
    torch.testing.assert_close(cross.values[keep], hf_cross.values[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["flan_t5", "marian"])
def test_sampling_first_step_scores_equal_hf(family):
    model = _model(family)
    ids, mask = _batch(3, 9, seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=1, do_sample=True, temperature=0.8,
                  top_k=30, top_p=0.9, num_return_sequences=2, return_dict_in_generate=True,
                  output_scores=True)
    ref = model.generate(ids, **kwargs).scores[0]
    ours = fd_generate(model, ids, fallback="error", **kwargs).scores[0]
    assert torch.equal(ours.isinf(), ref.isinf())
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), atol=1e-5, rtol=1e-4)


def test_sampling_seeded_reproducible_and_scores_follow_tokens():
    """Sampling with a seed: the same seed, the same tokens; each step's processed scores are
    HF's for the tokens drawn so far (checked by HF's greedy teacher-forced scores)."""
    model = _model("flan_t5")
    ids, mask = _batch(2, 9, seed=8)
    kwargs = dict(attention_mask=mask, max_new_tokens=15, do_sample=True, top_k=0,
                  return_dict_in_generate=True, output_scores=True, fallback="error")
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(fd_generate(model, ids, **kwargs))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)
    drawn = runs[0].sequences
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=drawn[:, :-1]).logits
    for step, scores in enumerate(runs[0].scores):
        live = ~scores.isinf()
        torch.testing.assert_close(scores[live], logits[:, step].float()[live], rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_beam_search_flan_t5_recipe(family, monkeypatch):
    """num_beams=5, no_repeat_ngram_size=2, early_stopping=True: sequences and scores as HF's
    up to near-ties."""
    model = _model(family)
    ids, mask = _batch(3, 9, seed=9)
    forbid_original_generate(monkeypatch)
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, max_new_tokens=16,
                       num_beams=5, no_repeat_ngram_size=2, early_stopping=True,
                       num_return_sequences=2)


@pytest.mark.parametrize("option", [dict(output_hidden_states=True),
                                    dict(decoder_attention_mask=torch.ones(3, 1,
                                                                           dtype=torch.long))])
def test_unsupported_options_fall_back_with_the_warning(option):
    model = _model("t5")
    ids, mask = _batch(3, 8, seed=10)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, **option)
    ref = model.generate(ids, **kwargs)
    with pytest.warns(UserWarning, match="running model.generate instead"):
        ours = fd_generate(model, ids, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)


def test_native_calls_do_not_warn():
    model = _model("marian")
    ids, mask = _batch(2, 8, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fd_generate(model, ids, attention_mask=mask, max_new_tokens=4)


def test_beam_sampling(monkeypatch):
    model = _model("bart")
    ids, mask = _batch(2, 8, seed=12)
    forbid_original_generate(monkeypatch)
    assert_beams_match(model, monkeypatch, ids, attention_mask=mask, max_new_tokens=10,
                       num_beams=3, do_sample=True, top_k=20, seed=5)


@pytest.mark.parametrize("option", [dict(penalty_alpha=0.6, top_k=4),
                                    dict(prompt_lookup_num_tokens=3)])
def test_other_modes_are_not_run_natively(option):
    model = _model("flan_t5")
    ids, mask = _batch(1, 8, seed=13)
    with pytest.raises(FallbackError, match="with an encoder-decoder model"):
        fd_generate(model, ids, attention_mask=mask, max_new_tokens=6, fallback="error",
                    **option)


def test_prompt_lookup_falls_back_with_the_warning():
    model = _model("flan_t5")
    ids, mask = _batch(1, 8, seed=13)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, prompt_lookup_num_tokens=3)
    ref = model.generate(ids, **kwargs)
    with pytest.warns(UserWarning, match="encoder-decoder model"):
        ours = fd_generate(model, ids, **kwargs)
    assert torch.equal(ours, ref)

