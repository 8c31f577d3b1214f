"""What real ``generate`` calls carry, run by fastdecode's own loop with HF's results.

Masks with right padding and holes, ``inputs_embeds``, ``position_ids``, ``logits_to_keep``,
``use_cache=False``, ``output_hidden_states``, a cache passed in and the cache returned. Each test
forbids the original ``model.generate`` (the fallback) while fastdecode runs; the options that are
deliberately left to HF fall back with exactly one warning naming them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from _hf_helpers import fd_generate, forbid_original_generate, padded_batch
from fastdecode.hf import compat
from tiny import tiny_model

NEW = 6
BASE = dict(max_new_tokens=NEW, do_sample=False)


@pytest.fixture(scope="module", params=["llama", "mistral"])  # mistral: a window of 7
def model(request):
    return tiny_model(request.param)


def _both(model, monkeypatch, **kwargs):
    """(HF's output, fastdecode's output) of the same call; fastdecode may not fall back.
    A cache argument is copied for each call (generate extends it in place)."""
    ref = model.generate(**copy.deepcopy(kwargs))
    with monkeypatch.context() as patch:
        forbid_original_generate(patch)
        out = fd_generate(model, **kwargs)
    return ref, out


def _masks(batch: int, width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    holes = (torch.rand(batch, width, generator=g) > 0.35).long()
    holes[:, 0] = 1  # every row keeps a token
    right = torch.ones(batch, width, dtype=torch.long)
    for row in range(batch):
        right[row, width - 2 * row:] = 0 if row else 1
    return {"right-padded": right, "lower-triangular": torch.tril(torch.ones(batch, width)).long(),
            "holes": holes}


@pytest.mark.parametrize("kind", ["right-padded", "lower-triangular", "holes"])
def test_any_mask_matches_hf(model, kind, monkeypatch):
    ids, _ = padded_batch([9, 9, 9], model.config.vocab_size, seed=5)
    mask = _masks(3, 9)[kind]
    ref, out = _both(model, monkeypatch, input_ids=ids, attention_mask=mask, **BASE)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("with_ids", [False, True], ids=["embeds", "embeds+ids"])
def test_inputs_embeds(model, with_ids, monkeypatch):
    ids, mask = padded_batch([7, 3, 5], model.config.vocab_size, seed=2)
    embeds = model.get_input_embeddings()(ids).detach()
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, **BASE)
    if with_ids:
        kwargs["input_ids"] = ids
    ref, out = _both(model, monkeypatch, **kwargs)
    assert torch.equal(out, ref)
    assert out.shape[1] == (ids.shape[1] if with_ids else 0) + NEW


def test_position_ids_and_logits_to_keep(model, monkeypatch):
    ids, mask = padded_batch([7, 3, 5], model.config.vocab_size, seed=6)
    positions = 3 * (mask.cumsum(-1) - 1).clamp(min=0)  # stretched: changes relative distances
    ref, out = _both(model, monkeypatch, input_ids=ids, attention_mask=mask,
                     position_ids=positions, **BASE)
    assert torch.equal(out, ref)
    assert not torch.equal(ref, model.generate(ids, attention_mask=mask, **BASE))
    ref, out = _both(model, monkeypatch, input_ids=ids, attention_mask=mask, logits_to_keep=3,
                     **BASE)
    assert torch.equal(out, ref)


def test_use_cache_false_gives_the_same_tokens(model, monkeypatch):
    ids, mask = padded_batch([7, 3], model.config.vocab_size, seed=8)
    ref, out = _both(model, monkeypatch, input_ids=ids, attention_mask=mask, use_cache=False,
                     return_dict_in_generate=True, **BASE)
    assert torch.equal(out.sequences, ref.sequences)
    assert getattr(out, compat.output_cache_field()) is None


def test_output_hidden_states(model, monkeypatch):
    ids, mask = padded_batch([7, 3], model.config.vocab_size, seed=9)
    ref, out = _both(model, monkeypatch, input_ids=ids, attention_mask=mask,
                     output_hidden_states=True, return_dict_in_generate=True, **BASE)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.hidden_states) == len(ref.hidden_states) == NEW
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _real_columns(mask: torch.Tensor, width: int) -> torch.Tensor:
    ones = torch.ones(mask.shape[0], width - mask.shape[1], dtype=torch.bool)
    return torch.cat([mask.bool(), ones], dim=1)


@pytest.mark.parametrize("kind", ["left-padded", "holes"])
def test_returned_cache_matches_hf_and_continues(model, kind, monkeypatch):
    """HF's columns, masked ones included (zero where HF keeps the masked tokens' keys)."""
    ids, mask = padded_batch([9, 4, 6], model.config.vocab_size, seed=10)
    if kind == "holes":
        mask = _masks(3, 9)["holes"]
        mask[1, -1] = 0  # a masked last column too
    ref, out = _both(model, monkeypatch, input_ids=ids, attention_mask=mask,
                     return_dict_in_generate=True, **BASE)
    field = compat.output_cache_field()
    ref_cache, our_cache = getattr(ref, field), getattr(out, field)
    assert type(our_cache) is type(ref_cache)
    assert our_cache.get_seq_length() == ref_cache.get_seq_length() == ids.shape[1] + NEW - 1
    for theirs, ours in zip(ref_cache.layers, our_cache.layers):
        assert ours.keys.shape == theirs.keys.shape
        keep = _real_columns(mask, ids.shape[1] + NEW - 1)[:, -theirs.keys.shape[2]:]
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):  # [B, H, S, D]
            torch.testing.assert_close(a.transpose(1, 2)[keep], b.transpose(1, 2)[keep],
                                       atol=1e-5, rtol=1e-5)
    # Continue with two more prompt tokens from either cache, by HF and by fastdecode.
    more = torch.randint(3, model.config.vocab_size, (3, 2), generator=torch.Generator()
                         .manual_seed(0))
    seq = torch.cat([ref.sequences, more], dim=1)
    kwargs = dict(input_ids=seq, attention_mask=_real_columns(mask, seq.shape[1]).long(), **BASE)
    name = compat.cache_name()  # past_key_values, or its newer name
    expected = model.generate(**{name: copy.deepcopy(ref_cache)}, **kwargs)
    assert torch.equal(model.generate(**{name: copy.deepcopy(our_cache)}, **kwargs), expected)
    for cache in (ref_cache, our_cache):
        _, cont = _both(model, monkeypatch, **{name: cache}, **kwargs)
        assert torch.equal(cont, expected)


@pytest.mark.parametrize("kwargs, name", [
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
    (dict(suppress_tokens=[5]), "suppress_tokens"),
], ids=["output_attentions", "suppress_tokens"])
def test_chosen_fallbacks_warn_once_and_match_hf(kwargs, name):
    model = tiny_model("llama")
    ids, mask = padded_batch([5, 3], model.config.vocab_size, seed=11)
    ref = model.generate(ids, attention_mask=mask, **BASE, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fd_generate(model, ids, attention_mask=mask, **BASE, **kwargs)
    ours = [w for w in caught if "fastdecode" in str(w.message)]
    assert len(ours) == 1 and name in str(ours[0].message)
    assert torch.equal(getattr(out, "sequences", out), getattr(ref, "sequences", ref))


def test_a_model_specific_generate_runs_as_it_is():
    """A model class with its own ``generate`` (multimodal and speech models have them) prepares
    its inputs its own way: fastdecode hands the call to it."""
    base = tiny_model("llama")
    own = type("LlamaWithOwnGenerate", (type(base),),
               {"generate": lambda self, *args, **kwargs: "its own"})
    base.__class__ = own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fd_generate(base, torch.tensor([[5, 6]]), max_new_tokens=2) == "its own"
    assert any("model-specific generate" in str(w.message) for w in caught)
