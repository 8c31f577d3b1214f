"""Right padding and masks with holes on the paged path: the masked tokens never enter the model.

``model.generate`` computes every column and masks the zeros out of every later query, takes the
first token's logits at the last column even when it is masked, and continues HF's position ids
from that column. The paged path drops the masked tokens and, for a masked last column, runs one
query over the row's cached prompt that writes nothing: the same tokens, for greedy decoding and
beam search. Where a sliding window could reach back across masked columns (HF counts them), the
call keeps HF's own cache and masks.
"""

from __future__ import annotations

import pytest
import torch

from _beam_helpers import assert_beams_match
from _hf_helpers import count_paged_calls, fd_generate, forbid_original_generate
from tiny import tiny_model

NEW = 5


def _masks(batch: int, width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    holes = (torch.rand(batch, width, generator=g) > 0.4).long()
    holes[:, 0] = 1  # every row keeps a token
    holes[0, -1] = 0  # one row ends on a hole
    right = torch.ones(batch, width, dtype=torch.long)
    for row in range(1, batch):
        right[row, width - row:] = 0
    return {"right-padded": right, "lower-triangular": torch.tril(torch.ones(batch, width)).long(),
            "holes": holes}


def _prompt(model, batch: int = 3, width: int = 8) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (batch, width),
                         generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # rotary and learned positions
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("kind", ["right-padded", "lower-triangular", "holes"])
def test_greedy_on_masked_prompts_runs_paged_with_hf_tokens(model, kind, monkeypatch):
    ids = _prompt(model)
    mask = _masks(*ids.shape)[kind]
    assert bool((mask[:, -1] == 0).any())  # a masked last column: the query that writes nothing
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        out = fd_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert counts["paged_attention"] > 0 and counts["dynamic_cache"] == 0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["right-padded", "holes"])
def test_beam_search_on_masked_prompts_runs_paged_with_hf_beams(model, kind, monkeypatch):
    ids = _prompt(model)
    mask = _masks(*ids.shape)[kind]
    with count_paged_calls(monkeypatch) as counts:
        assert_beams_match(model, monkeypatch, ids, attention_mask=mask, num_beams=3,
                           num_return_sequences=2, max_new_tokens=NEW)
    assert counts["paged_attention"] > 0


def test_masked_prompts_keep_hf_cache_when_a_window_could_reach_across(monkeypatch):
    model = tiny_model("mistral")  # its window is shorter than this call
    ids = _prompt(model, width=model.config.sliding_window + 2)
    mask = _masks(*ids.shape)["holes"]
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        out = fd_generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert counts["paged_attention"] == 0
    assert torch.equal(out, ref)
