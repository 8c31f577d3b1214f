"""Statistical tests of sample on every backend: many seeded draws against the exact float64
distribution of tests/reference.py.

Draws are keyed by (seed, offset), so each test is deterministic: the chi-square threshold
(p-value > 1e-6) fixes a negligible false-failure probability once for all seeds, and each test
also checks that the same counts reject a slightly wrong distribution (no top-p, or a 10% wrong
temperature), so it cannot pass by accident.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import reference
from fastdecode import ops
from sampling_cases import random_logits

P_FLOOR = 1e-6


@pytest.fixture
def backend(backend):
    """The interpreter runs one program per row serially (minutes per case here); Triton's draws
    are instead held bit-equal to the torch backend's for the same (seed, offset) in
    tests/test_triton_specific.py, and these statistics run for Triton on a GPU."""
    if backend.interpreted:
        pytest.skip("statistical draws under the Triton interpreter: see the fixture docstring")
    return backend


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; bins with expected count < 5 are pooled into one."""
    n = int(counts.sum())
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < 5:  # merge a small pooled bin into the smallest big one
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmin()] += counts[~big].sum()
        exp[exp.argmin()] += expected[~big].sum()
    exp = exp * (obs.sum() / exp.sum())
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def _draw(backend, row: torch.Tensor, num_draws: int, calls: int = 1, **params) -> torch.Tensor:
    """Token counts [V] of num_draws seeded draws from one row (repeated over a batch)."""
    per_call = num_draws // calls
    logits = row.to(backend.device).expand(per_call, -1)  # stride 0: no copy of the row
    if "seen_tokens" in params:
        params["seen_tokens"] = params["seen_tokens"].to(backend.device).expand(per_call, -1)
    counts = torch.zeros(row.shape[0], dtype=torch.int64)
    for c in range(calls):
        seeds = torch.arange(per_call, device=backend.device) + c * per_call + 12345
        drawn = ops.sample(logits, seeds=seeds, offsets=torch.full_like(seeds, 3),
                           backend=backend.name, **params).cpu()
        assert ((drawn >= 0) & (drawn < row.shape[0])).all()
        counts += torch.bincount(drawn, minlength=row.shape[0])
    return counts


def _check(counts, row, wrong: dict, **params):
    probs = reference.distribution(row[None], **params)[0]
    assert counts[probs == 0].sum() == 0, "drew a filtered token"
    p = _chi_square_pvalue(counts, probs)
    assert p > P_FLOOR, f"chi-square p = {p:.3g}"
    wrong_probs = reference.distribution(row[None], **{**params, **wrong})[0]
    p_wrong = _chi_square_pvalue(counts, wrong_probs.clamp(min=1e-12))
    assert p_wrong < P_FLOOR, f"test has no power: a wrong distribution gets p = {p_wrong:.3g}"
    tv = 0.5 * (counts.double() / counts.sum() - probs).abs().sum()
    tv_wrong = 0.5 * (wrong_probs - probs).abs().sum()
    assert tv < tv_wrong, (float(tv), float(tv_wrong))


SMALL = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=0.9, min_p=0.15),
    dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.8,
         seen_tokens=torch.tensor([[0, 3, 3, 7, -1]])),
]


@pytest.mark.parametrize("params", SMALL, ids=lambda p: "-".join(p))
def test_small_vocab_distribution(backend, params):
    vocab = 12
    row = random_logits(1, vocab, torch.float32, scale=1.0)[0]
    row[0] = row.max() + 0.5  # a positive logit the penalty hits
    counts = _draw(backend, row, 20000, **params)
    wrong = dict(temperature=params["temperature"] * 1.1)
    _check(counts, row, wrong, **params)


@pytest.mark.parametrize("vocab", [50257, 128256])
@pytest.mark.parametrize("params", [
    dict(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2),  # the benchmarked path
    dict(temperature=0.7, top_p=0.9),  # top-p over the whole vocabulary (histogram search)
    dict(temperature=1.0, min_p=0.2),  # min-p over the whole vocabulary
], ids=["topk-topp-penalty", "topp", "minp"])
def test_large_vocab_distribution(backend, vocab, params):
    if backend.name == "torch":
        pytest.skip("the torch backend sorts every row: covered by the small-vocabulary tests")
    # A peaked row: the filters leave a few dozen tokens, so few draws test the distribution.
    row = random_logits(1, vocab, torch.float32, scale=1.0)[0]
    row[torch.randperm(vocab)[:40]] += torch.linspace(8.0, 12.0, 40)
    seen = torch.randperm(vocab)[:512][None]
    seen[0, :5] = row.topk(5).indices  # the penalty moves the top tokens
    params = {**params, "seen_tokens": seen}
    counts = _draw(backend, row, 8000, 2, **params)
    wrong = ({"top_p": 1.0} if "top_p" in params else {"min_p": 0.0})
    _check(counts, row, wrong, **params)
