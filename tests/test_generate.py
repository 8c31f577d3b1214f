"""fastdecode.generate == model.generate (greedy) on every family, over the paged path.

Each test proves the paged path really ran: ops.append_kv and ops.paged_attention are called once
per layer per forward, no DynamicCache is built and the original model.generate is never called.
"""

from __future__ import annotations

import pytest
import torch

from _hf_helpers import (assert_greedy_match, count_paged_calls, fd_generate,
                         forbid_original_generate, padded_batch)
from tiny import tiny_model

PAGED_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox", "opt"]
NEW = 13  # crosses a 16-token block boundary with the 11-token prompts


def _hf(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, return_dict_in_generate=True,
                          output_scores=True, **kwargs)


@pytest.fixture(scope="module", params=PAGED_FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("lengths", [[11], [11, 4, 1, 7]], ids=["single", "padded"])
def test_greedy_matches_hf_on_paged_path(family_model, lengths, monkeypatch):
    family, model = family_model
    ids, mask = padded_batch(lengths, model.config.vocab_size, seed=len(lengths))
    ref = _hf(model, ids, mask, max_new_tokens=NEW, do_sample=False)
    attn_before = model.config._attn_implementation
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        out = fd_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    forwards = out.shape[1] - ids.shape[1]
    layers = model.config.num_hidden_layers
    assert counts["append_kv"] == counts["paged_attention"] == layers * forwards
    assert counts["dynamic_cache"] == 0
    assert model.config._attn_implementation == attn_before
    assert_greedy_match(ref, out, ids.shape[1])


def _eos_setup(model):
    """A padded batch and an EOS id that greedy decoding produces mid-way in row 0."""
    ids, mask = padded_batch([9, 5, 2], model.config.vocab_size, seed=7)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                           eos_token_id=None)
    return ids, mask, int(plain[0, ids.shape[1] + 3])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eos_mid_sequence_pads_after(family):
    model = tiny_model(family)
    ids, mask, eos = _eos_setup(model)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=1)
    ref = _hf(model, ids, mask, **kwargs)
    out = fd_generate(model, ids, attention_mask=mask, **kwargs)
    assert_greedy_match(ref, out, ids.shape[1])
    row0 = out[0, ids.shape[1]:]
    first = int((row0 == eos).nonzero()[0])
    assert first <= 3 and (row0[first + 1:] == 1).all()


def test_min_new_tokens_and_min_length():
    model = tiny_model("llama")
    ids, mask, eos = _eos_setup(model)
    for kwargs in (dict(min_new_tokens=6), dict(min_length=ids.shape[1] + 5)):
        kwargs.update(max_new_tokens=NEW, do_sample=False, eos_token_id=[eos, 2])
        ref = _hf(model, ids, mask, **kwargs)
        out = fd_generate(model, ids, attention_mask=mask, **kwargs)
        assert_greedy_match(ref, out, ids.shape[1])
        assert out[0, ids.shape[1] + 3] != eos


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_repetition_penalty_greedy(family):
    model = tiny_model(family)
    ids, mask = padded_batch([10, 3, 6], model.config.vocab_size, seed=3)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, repetition_penalty=1.7)
    ref = _hf(model, ids, mask, **kwargs)
    out = fd_generate(model, ids, attention_mask=mask, **kwargs)
    assert_greedy_match(ref, out, ids.shape[1])
    plain = fd_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(plain, out)  # the penalty changed something


def test_max_length_and_default_length():
    model = tiny_model("llama")
    ids, mask = padded_batch([6, 4], model.config.vocab_size)
    for kwargs in (dict(max_length=15), {}, dict(max_new_tokens=1)):
        ref = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        out = fd_generate(model, ids, attention_mask=mask, do_sample=False, **kwargs)
        assert torch.equal(out, ref), kwargs


def test_no_attention_mask_infers_padding():
    model = tiny_model("llama")
    ids, _ = padded_batch([8, 3], model.config.vocab_size, pad=0)  # pad_token_id 0
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    out = fd_generate(model, ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


def _routes_through_attention_interface(model) -> bool:
    """Read off the installed transformers (releases move families onto the interface)."""
    return bool(getattr(type(model), "_supports_attention_backend", False))


@pytest.mark.parametrize("family", ["falcon", "gptj", "gpt_oss"])
def test_generic_families_match_hf(family, monkeypatch):
    """Falcon and GPT-J (whose attention some transformers releases keep outside
    AttentionInterface) and gpt-oss (attention sinks, which the paged kernels do not implement):
    paged when the installed release allows it, otherwise the model's own cache and attention;
    fastdecode's loop and sampling either way."""
    model = tiny_model(family)
    ids, mask = padded_batch([9, 4], model.config.vocab_size, seed=5)
    ref = _hf(model, ids, mask, max_new_tokens=NEW, do_sample=False)
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        out = fd_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    paged = _routes_through_attention_interface(model) and family != "gpt_oss"
    assert (counts["paged_attention"] > 0) == paged
    assert (counts["dynamic_cache"] > 0) == (not paged)
    assert_greedy_match(ref, out, ids.shape[1])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bfloat16_matches_hf_up_to_near_ties(family):
    model = tiny_model(family, dtype=torch.bfloat16)
    ids, mask = padded_batch([9, 5, 12], model.config.vocab_size, seed=11)
    ref = _hf(model, ids, mask, max_new_tokens=NEW, do_sample=False)
    out = fd_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    # bf16 keeps 8 significant bits: logits carry ~2**-8 relative rounding on both sides.
    assert_greedy_match(ref, out, ids.shape[1], tie=2 * 2.0**-8, relative=True)


def test_4d_mask_raises_like_hf():
    model = tiny_model("llama")
    ids, mask = padded_batch([5, 3], model.config.vocab_size)
    mask4d = mask[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    with pytest.raises(ValueError) as hf_exc:
        model.generate(ids, attention_mask=mask4d, max_new_tokens=2)
    with pytest.raises(type(hf_exc.value), match=str(hf_exc.value)[:20]):
        fd_generate(model, ids, attention_mask=mask4d, max_new_tokens=2)
