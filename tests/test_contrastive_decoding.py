"""Contrastive decoding with an amateur model: fastdecode.generate against a float64 loop over the
two models, the torch formula against a float64 reference, option checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from _hf_helpers import fd_generate, forbid_original_generate, padded_batch
from fastdecode.hf.contrastive_decoding import contrastive_logits
from tiny import tiny_model

TIE = 1e-4


def reference_scores(expert: torch.Tensor, amateur: torch.Tensor, alpha: float,
                     plausibility: float) -> torch.Tensor:
    """[V] float64 logits of both models -> [V] float64 contrastive scores, token by token."""
    p_e, log_e, log_a = expert.softmax(-1), expert.log_softmax(-1), amateur.log_softmax(-1)
    limit = plausibility * float(p_e.max())
    return torch.tensor([float(log_e[x] - alpha * log_a[x]) if p_e[x] >= limit else -math.inf
                         for x in range(expert.shape[0])], dtype=torch.float64)


def reference_greedy(expert, amateur, prompt: list[int], steps: int, alpha: float,
                     plausibility: float) -> tuple[list[int], list[float]]:
    """Both models re-run on the whole sequence every step, float64 -> (tokens, top-2 gaps)."""
    expert64, amateur64 = copy.deepcopy(expert).double(), copy.deepcopy(amateur).double()
    seq, gaps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            batch = torch.tensor([seq])
            scores = reference_scores(expert64(batch).logits[0, -1], amateur64(batch).logits[0, -1],
                                      alpha, plausibility)
            top = scores.topk(2).values
            gaps.append(float(top[0] - top[1]) if math.isfinite(top[1]) else math.inf)
            seq.append(int(scores.argmax()))
    return seq[len(prompt):], gaps


@pytest.mark.parametrize("alpha, plausibility", [(0.5, 0.1), (1.0, 0.0), (0.1, 0.5)])
def test_formula_equals_float64_reference(alpha, plausibility):
    torch.manual_seed(0)
    expert, amateur = torch.randn(5, 37) * 3, torch.randn(5, 37) * 3
    ours = contrastive_logits(expert, amateur, alpha=alpha, plausibility=plausibility)
    for row in range(5):
        ref = reference_scores(expert[row].double(), amateur[row].double(), alpha, plausibility)
        assert torch.equal(ours[row].isinf(), ref.isinf())
        finite = ~ref.isinf()
        torch.testing.assert_close(ours[row][finite].double(), ref[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, amateur_layers", [("llama", 1), ("gpt2", 1)])
def test_greedy_equals_two_model_reference_loop(family, amateur_layers, monkeypatch):
    expert = tiny_model(family)
    amateur = tiny_model(family, seed=5, **({"n_layer": amateur_layers} if family == "gpt2"
                                           else {"num_hidden_layers": amateur_layers}))
    ids, mask = padded_batch([6, 13, 2], expert.config.vocab_size, seed=4)
    forbid_original_generate(monkeypatch)
    ours = fd_generate(expert, ids, attention_mask=mask, max_new_tokens=15, eos_token_id=None,
                       amateur_model=amateur, contrastive_alpha=0.5, plausibility=0.05)
    greedy = fd_generate(expert, ids, attention_mask=mask, max_new_tokens=15, eos_token_id=None)
    assert not torch.equal(ours, greedy)  # the amateur changes the result
    for row in range(ids.shape[0]):
        prompt = ids[row][mask[row].bool()].tolist()
        ref, gaps = reference_greedy(expert, amateur, prompt, 15, 0.5, 0.05)
        mine = ours[row, ids.shape[1]:].tolist()
        differ = [i for i, (a, b) in enumerate(zip(mine, ref)) if a != b]
        if differ:
            assert gaps[differ[0]] < TIE, (row, differ[0], gaps[differ[0]])


def test_sampling_draws_within_the_plausible_set():
    """Sampled tokens follow the contrastive scores: never outside the plausible set, and a
    strict plausibility leaves exactly the expert's greedy token."""
    expert, amateur = tiny_model("qwen3"), tiny_model("qwen3", seed=3)
    ids, mask = padded_batch([5], expert.config.vocab_size, seed=1)
    rows = ids.expand(200, -1)
    kwargs = dict(max_new_tokens=1, do_sample=True, top_k=0, amateur_model=amateur)
    with torch.no_grad():
        logits = expert(ids).logits[0, -1].double()
    probs = logits.softmax(-1)
    plausible = probs >= 0.2 * probs.max()
    out = fd_generate(expert, rows, plausibility=0.2, **kwargs)[:, -1]
    assert plausible[out].all()
    out = fd_generate(expert, rows, plausibility=1.0, **kwargs)[:, -1]
    assert (out == logits.argmax()).all()


@pytest.mark.parametrize("options, match", [
    (dict(contrastive_alpha=-1.0), "contrastive_alpha"),
    (dict(plausibility=1.5), "plausibility"),
    (dict(penalty_alpha=0.5, top_k=4), "amateur_model with generation mode"),
])
def test_bad_options_are_refused(options, match):
    expert = tiny_model("llama")
    ids, mask = padded_batch([4], expert.config.vocab_size, seed=2)
    with pytest.raises(ValueError, match=match):
        fd_generate(expert, ids, attention_mask=mask, max_new_tokens=2,
                    amateur_model=tiny_model("llama", seed=1), **options)


def test_options_without_an_amateur_are_refused():
    expert = tiny_model("llama")
    ids, mask = padded_batch([4], expert.config.vocab_size, seed=2)
    with pytest.raises(ValueError, match="need amateur_model"):
        fd_generate(expert, ids, attention_mask=mask, max_new_tokens=2, plausibility=0.2)
