"""The float64 reference process_logits (tests/reference.py), and the torch backend, against
transformers' own processor chain: RepetitionPenalty -> Temperature -> TopK -> TopP -> MinP.

Random logits without ties: the reference keeps ties inside top-p where HF's sort breaks them,
identical otherwise. HF computes in float32, so a token within float32 rounding of a top-p /
min-p boundary may fall either way (see sampling_cases.assert_processed_matches).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import reference
from fastdecode import ops
from pairwise import cases

SPACE = {
    "vocab": [7, 1000, 50257],
    "temperature": [0.0, 0.5, 1.0, 1.6],
    "top_k": [0, 1, 10, 200],
    "top_p": [1.0, 0.95, 0.6, 0.05],
    "min_p": [0.0, 0.02, 0.3],
    "penalty": [1.0, 1.3, 0.8],
}


def hf_chain(temperature, top_k, top_p, min_p, penalty) -> LogitsProcessorList:
    """The processors model.generate builds for these settings, in its order."""
    chain = LogitsProcessorList()
    if penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature > 0:  # greedy: HF applies no warper
        chain.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            chain.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p))
        if min_p > 0.0:
            chain.append(MinPLogitsWarper(min_p))
    return chain


def _same_filtering(out: torch.Tensor, hf: torch.Tensor, name: str) -> None:
    kept, hf_kept = out > -math.inf, hf > -math.inf
    differ = (kept != hf_kept).sum().item()
    # Float32 rounding in HF's cumulative sum may move at most one token per row.
    assert differ <= out.shape[0] and (differ == 0 or out.shape[-1] >= 1000), (name, differ)
    both = kept & hf_kept
    torch.testing.assert_close(out[both].double(), hf[both].double(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(*cases(SPACE))
def test_reference_and_torch_backend_match_transformers(vocab, temperature, top_k, top_p, min_p,
                                                        penalty):
    batch, length = 4, 16
    logits = torch.randn(batch, vocab) * 3.0  # continuous values: no ties
    seen = torch.randint(0, vocab, (batch, length))
    hf = hf_chain(temperature, top_k, top_p, min_p, penalty)(seen, logits.clone())
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=penalty, seen_tokens=seen)
    _same_filtering(reference.process_logits(logits, **params), hf, "reference")
    _same_filtering(ops.process_logits(logits, backend="torch", **params), hf, "torch backend")
