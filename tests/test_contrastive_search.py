"""Contrastive search (penalty_alpha, top_k) in fastdecode.generate against a float64 reference
loop with the semantics transformers had before the method left the library."""

from __future__ import annotations

import pytest
import torch

from _hf_helpers import count_paged_calls, fd_generate, forbid_original_generate, padded_batch
from contrastive_reference import contrastive_search
from tiny import tiny_model

TIE = 1e-4


def assert_matches_reference(model, ids, mask, ours, alpha, top_k):
    """Each row equals the reference up to its first near-tie of contrastive scores."""
    width = ids.shape[1]
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()].tolist()
        ref, gaps = contrastive_search(model, prompt, alpha, top_k, ours.shape[1] - width)
        mine = ours[row, width:].tolist()
        differ = [i for i, (a, b) in enumerate(zip(mine, ref)) if a != b]
        if differ:
            assert gaps[differ[0]] < TIE, (row, differ[0], gaps[differ[0]], mine, ref)


@pytest.mark.parametrize("family, alpha, top_k", [("llama", 0.6, 4), ("gpt2", 0.4, 3),
                                                  ("qwen2", 0.9, 5)])
def test_contrastive_search_equals_reference(family, alpha, top_k, monkeypatch):
    model = tiny_model(family)
    ids, mask = padded_batch([7, 3, 18], model.config.vocab_size, seed=11)
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        ours = fd_generate(model, ids, attention_mask=mask, penalty_alpha=alpha, top_k=top_k,
                           max_new_tokens=21, eos_token_id=None)
    # One packed forward per step scores every row's k candidates (plus the prefill).
    assert counts["dynamic_cache"] == 0
    assert counts["paged_attention"] == model.config.num_hidden_layers * (1 + 21)
    assert ours.shape == (3, ids.shape[1] + 21)
    assert_matches_reference(model, ids, mask, ours, alpha, top_k)


def test_penalty_changes_the_choice(monkeypatch):
    """With a large alpha the output differs from greedy (the penalty really acts), and the
    return_dict form gives HF's processed scores of every step."""
    model = tiny_model("llama")
    ids, mask = padded_batch([9], model.config.vocab_size, seed=2)
    greedy = fd_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    out = fd_generate(model, ids, attention_mask=mask, penalty_alpha=0.9, top_k=6,
                      max_new_tokens=12, eos_token_id=None, return_dict_in_generate=True,
                      output_scores=True)
    assert not torch.equal(out.sequences, greedy)
    assert len(out.scores) == 12 and out.scores[0].shape == (1, model.config.vocab_size)
    assert_matches_reference(model, ids, mask, out.sequences, 0.9, 6)


def test_bad_top_k_is_refused():
    model = tiny_model("llama")
    ids, mask = padded_batch([4], model.config.vocab_size, seed=2)
    with pytest.raises(ValueError, match="top_k"):
        fd_generate(model, ids, attention_mask=mask, penalty_alpha=0.5, top_k=10_000,
                    max_new_tokens=3)
