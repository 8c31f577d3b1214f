"""Speculative decoding in fastdecode.generate (prompt lookup, draft model): greedy output is the
target's own greedy output, drafts really are verified several at a time, rejected slots are
rolled back, and what the native path does not run falls back with a reason."""

from __future__ import annotations

import pytest
import torch

from _hf_helpers import assert_greedy_match, fd_generate, forbid_original_generate, padded_batch
from _spec_helpers import echo_model
from fastdecode.hf import runner as hf_runner
from fastdecode.hf.generate import FallbackError
from tiny import tiny_model

FAMILIES = ("llama", "qwen2", "gpt2", "gpt_neox")


def repetitive_batch(lengths, vocab: int, seed: int):
    """Left-padded prompts whose rows repeat a random phrase (prompt lookup finds matches)."""
    ids, mask = padded_batch(lengths, vocab, seed=seed)
    for row, n in enumerate(lengths):
        phrase = ids[row, -n:][: max(2, n // 3)]
        ids[row, -n:] = phrase.repeat(n // len(phrase) + 1)[:n]
    return ids, mask


def hf_greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                          output_scores=True, **kwargs)


def count_target_forwards(monkeypatch, model) -> dict:
    """Counts PagedRunner.forward calls made for ``model`` (not for a draft model)."""
    calls = {"n": 0}
    forward = hf_runner.PagedRunner.forward

    def counted(self, *args, **kwargs):
        calls["n"] += self.model is model
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(hf_runner.PagedRunner, "forward", counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_greedy_equals_plain_greedy(family, monkeypatch):
    model = tiny_model(family)
    ids, mask = repetitive_batch([13, 5, 21], model.config.vocab_size, seed=3)
    kwargs = dict(max_new_tokens=24, eos_token_id=None)
    ref = hf_greedy(model, ids, mask, **kwargs)
    forbid_original_generate(monkeypatch)
    ours = fd_generate(model, ids, attention_mask=mask, do_sample=False,
                       prompt_lookup_num_tokens=4, **kwargs)
    assert_greedy_match(ref, ours, ids.shape[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_model_greedy_equals_plain_greedy(family, monkeypatch):
    """A random draft of another seed: most drafts are rejected, so rollback is exercised."""
    model = tiny_model(family)
    draft = tiny_model(family, seed=7)
    ids, mask = padded_batch([9, 4, 16], model.config.vocab_size, seed=5)
    kwargs = dict(max_new_tokens=19, eos_token_id=None)
    ref = hf_greedy(model, ids, mask, **kwargs)
    draft.generation_config.num_assistant_tokens = 3
    forbid_original_generate(monkeypatch)
    ours = fd_generate(model, ids, attention_mask=mask, do_sample=False, assistant_model=draft,
                       **kwargs)
    assert_greedy_match(ref, ours, ids.shape[1])


@pytest.mark.parametrize("schedule", ["constant", "heuristic"])
def test_a_perfect_draft_is_accepted_whole(schedule, monkeypatch):
    """The target as its own draft: every draft is kept, so the target runs about once per
    num_assistant_tokens + 1 tokens, and stops exactly at EOS / max_new_tokens per row."""
    model = tiny_model("llama")
    ids, mask = padded_batch([7, 12], model.config.vocab_size, seed=2)
    eos = int(hf_greedy(model, ids, mask, max_new_tokens=9, eos_token_id=None).sequences[1, -1])
    ref = hf_greedy(model, ids, mask, max_new_tokens=25, eos_token_id=eos)
    assistant = tiny_model("llama")
    assistant.generation_config.num_assistant_tokens = 4
    assistant.generation_config.num_assistant_tokens_schedule = schedule
    calls = count_target_forwards(monkeypatch, model)
    ours = fd_generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=25,
                       eos_token_id=eos, assistant_model=assistant)
    assert_greedy_match(ref, ours, ids.shape[1])
    new = ours.shape[1] - ids.shape[1]
    assert calls["n"] <= 1 + -(-(new - 1) // 5), (calls["n"], new)  # prefill + rounds of 5


def test_rows_finishing_in_different_rounds(monkeypatch):
    """A close draft (the target with a perturbed head) accepts different amounts per row, so
    rows reach max_new_tokens in different rounds; prompt + new tokens fill whole cache blocks,
    so a finished row's drafts must still find room."""
    model = tiny_model("llama")
    draft = tiny_model("llama")
    draft.lm_head.weight.data += 0.02 * torch.randn(draft.lm_head.weight.shape,
                                                    generator=torch.Generator().manual_seed(0))
    draft.generation_config.num_assistant_tokens = 3
    ids, mask = padded_batch([6] * 5, model.config.vocab_size, seed=12)
    kwargs = dict(max_new_tokens=26, eos_token_id=None)  # 6 + 26 = two blocks of 16
    ref = hf_greedy(model, ids, mask, **kwargs)
    forbid_original_generate(monkeypatch)
    ours = fd_generate(model, ids, attention_mask=mask, do_sample=False, assistant_model=draft,
                       **kwargs)
    assert_greedy_match(ref, ours, ids.shape[1])


@pytest.mark.parametrize("draft", ["prompt_lookup", "assistant_model"])
def test_min_new_tokens_bans_eos_in_verification(draft, monkeypatch):
    """EOS = a token greedy decoding emits early: HF bans it until min_new_tokens, and so must
    every verified position (the ban moves with each row's length)."""
    model = tiny_model("gpt2")
    ids, mask = repetitive_batch([8, 14], model.config.vocab_size, seed=4)
    eos = int(hf_greedy(model, ids, mask, max_new_tokens=3, eos_token_id=None).sequences[0, -1])
    kwargs = dict(max_new_tokens=16, min_new_tokens=9, eos_token_id=eos, pad_token_id=0)
    ref = hf_greedy(model, ids, mask, **kwargs)
    extra = (dict(prompt_lookup_num_tokens=3) if draft == "prompt_lookup"
             else dict(assistant_model=tiny_model("gpt2", seed=9)))
    forbid_original_generate(monkeypatch)
    ours = fd_generate(model, ids, attention_mask=mask, do_sample=False, **kwargs, **extra)
    assert_greedy_match(ref, ours, ids.shape[1])


def test_prompt_lookup_drafts_are_verified_together(monkeypatch):
    """Accepted lookup drafts: the target runs far fewer forwards than it produces tokens."""
    model = echo_model()
    ids, mask = padded_batch([6, 11], model.config.vocab_size, seed=8)
    ref = hf_greedy(model, ids, mask, max_new_tokens=30, eos_token_id=None)
    assert (ref.sequences[:, -1] == ids[:, -1]).all()  # the model does echo
    calls = count_target_forwards(monkeypatch, model)
    ours = fd_generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                       eos_token_id=None, prompt_lookup_num_tokens=10)
    assert_greedy_match(ref, ours, ids.shape[1])
    assert calls["n"] < 30 // 3, calls["n"]


@pytest.mark.parametrize("option", [dict(repetition_penalty=1.2), dict(output_scores=True,
                                    return_dict_in_generate=True)], ids=str)
def test_unsupported_combinations_fall_back_with_a_reason(option):
    model = tiny_model("llama")
    ids, mask = padded_batch([5], model.config.vocab_size, seed=1)
    with pytest.raises(FallbackError, match="speculative decoding"):
        fd_generate(model, ids, attention_mask=mask, max_new_tokens=4, prompt_lookup_num_tokens=3,
                    fallback="error", **option)


@pytest.mark.parametrize("lookup, ngram, draft", [(3, 0, None), (0, None, None), (None, None, 0)])
def test_invalid_draft_lengths_are_refused(lookup, ngram, draft):
    model = tiny_model("llama")
    ids, mask = padded_batch([5], model.config.vocab_size, seed=1)
    assistant = None
    if draft is not None:
        assistant = tiny_model("llama", seed=2)
        assistant.generation_config.num_assistant_tokens = draft
    match = "num_assistant_tokens" if draft is not None else "must be >= 1"
    with pytest.raises(ValueError, match=match):
        fd_generate(model, ids, attention_mask=mask, max_new_tokens=4,
                    prompt_lookup_num_tokens=lookup, max_matching_ngram_size=ngram,
                    assistant_model=assistant)
