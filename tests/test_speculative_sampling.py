"""Sampled speculative decoding follows the target's distribution exactly (rejection sampling).

The verifier is tested on a small vocabulary with many rows at once, against the float64
processed distribution (tests/reference.py); the whole generate path against the exact joint
distribution of the first tokens of a tiny model, enumerated in float64.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import reference
from _hf_helpers import BACKEND, fd_generate, forbid_original_generate, padded_batch
from _spec_helpers import echo_model, exact_joint, p_value
from fastdecode.hf.speculative import Verifier
from tiny import tiny_model

WARP = dict(temperature=0.8, top_k=4, top_p=1.0, min_p=0.0)


def verifier(do_sample: bool = True) -> Verifier:
    return Verifier(SimpleNamespace(do_sample=do_sample, **WARP), BACKEND)


@pytest.mark.parametrize("drafter", ["model", "deterministic"])
def test_verifier_keeps_the_target_distribution(drafter):
    """Rows share per-position target logits [K + 1, V]; drafts come from q (or are fixed
    tokens). The first emitted token follows p_0; given d_1 kept, the second follows p_1."""
    torch.manual_seed(0)
    rows, width, vocab = 30000, 3, 7
    logits = torch.randn(width + 1, vocab) * 2
    p = reference.distribution(logits, **WARP)
    if drafter == "model":
        q = torch.softmax(torch.randn(width, vocab) * 2, -1)
        drafts = torch.multinomial(q, rows, replacement=True).T  # [rows, K]
        probs = q.expand(rows, -1, -1).float()
    else:
        drafts = torch.randint(0, vocab, (width,)).expand(rows, -1)
        probs = None
    lengths = torch.full((rows,), width)
    accepted, following = verifier()(logits.expand(rows, -1, -1).float(), drafts, lengths, probs)
    first = torch.where(accepted > 0, drafts[:, 0], following)
    assert p_value(first, p[0]) > 1e-3
    second = torch.where(accepted > 1, drafts[:, 1], following)[accepted >= 1]
    assert p_value(second, p[1]) > 1e-3
    # The test has power: the drafts themselves (what accepting everything would emit) fail it.
    if drafter == "model":
        assert p_value(drafts[:, 0], p[0]) < 1e-6


def test_verifier_greedy_keeps_the_argmax_prefix():
    torch.manual_seed(1)
    logits = torch.randn(5, 4, 9)
    best = logits.argmax(-1)
    drafts = best[:, :3].clone()
    drafts[1, 1] = (drafts[1, 1] + 1) % 9  # rejected at the second draft
    drafts[2, 0] = (drafts[2, 0] + 1) % 9  # rejected at once
    lengths = torch.tensor([3, 3, 3, 2, 0])
    accepted, following = verifier(do_sample=False)(logits, drafts, lengths, None)
    assert accepted.tolist() == [3, 1, 0, 2, 0]
    assert following.tolist() == best.gather(1, accepted[:, None])[:, 0].tolist()


@pytest.mark.parametrize("draft", ["assistant_model", "prompt_lookup"])
def test_generate_samples_the_target_joint_distribution(draft, monkeypatch):
    """3000 rows of one prompt, 4 new tokens each (the first from the prefill, the next up to
    three from one round of two drafts): their joint frequencies against the exact joint."""
    # An echo model with a flat enough head: repeating the last token is likely, not certain,
    # so lookup drafts (repeats, from the prompt's run of one token) are accepted or rejected.
    model = echo_model(scale=0.25) if draft == "prompt_lookup" else tiny_model("llama")
    ids, _ = padded_batch([5], model.config.vocab_size, seed=6)
    ids = torch.cat([ids, ids[:, -1:].expand(-1, 3)], 1)
    rows, steps = 3000, 4
    kwargs = dict(do_sample=True, max_new_tokens=steps, eos_token_id=None, **WARP)
    if draft == "assistant_model":
        assistant = tiny_model("llama")  # the target with a perturbed head: a good, unequal draft
        assistant.lm_head.weight.data += 0.05 * torch.randn_like(assistant.lm_head.weight)
        assistant.generation_config.num_assistant_tokens = 2
        kwargs["assistant_model"] = assistant
    else:
        kwargs["prompt_lookup_num_tokens"] = 2
    forbid_original_generate(monkeypatch)
    torch.manual_seed(3)
    out = fd_generate(model, ids.expand(rows, -1), **kwargs)[:, ids.shape[1]:]
    joint = exact_joint(model, ids[0], steps, WARP)
    cells = {seq: i for i, seq in enumerate(joint)}
    index = [cells.get(tuple(r), -1) for r in out.tolist()]
    assert min(index) >= 0, "a sequence of probability zero was drawn"
    assert p_value(torch.tensor(index), torch.tensor(list(joint.values()))) > 1e-3
