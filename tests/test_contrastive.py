"""ops.contrastive_logits on every backend against the float64 reference (tests/reference.py),
with the 2x rule against the same formula in float32; its NaN rows and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import reference
from fastdecode import ops
from pairwise import cases
from sampling_cases import random_logits

pytestmark = pytest.mark.ops("contrastive_logits")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPACE = {
    "vocab": [1, 7, 1000, 50257],
    "batch": [1, 3, 17],
    "expert_dtype": DTYPES,
    "amateur_dtype": DTYPES,
    "alpha": [0.0, 0.1, 1.0, 7.5, "mixed"],
    "plausibility": [0.0, 0.1, 0.5, 1.0, "mixed"],
}
MIXED = {"alpha": [0.0, 0.5, 2.0], "plausibility": [0.0, 0.02, 0.3, 1.0]}


def _param(name, value, batch: int):
    """The scalar ``value``, or for "mixed" a [batch] tensor cycling through MIXED[name]."""
    if value != "mixed":
        return value
    choices = MIXED[name]
    return torch.tensor([choices[b % len(choices)] for b in range(batch)])


def _check(backend, expert, amateur, alpha, plausibility) -> torch.Tensor:
    dev = backend.device
    on_dev = [p.to(dev) if isinstance(p, torch.Tensor) else p for p in (alpha, plausibility)]
    got = ops.contrastive_logits(expert.to(dev), amateur.to(dev), alpha=on_dev[0],
                                 plausibility=on_dev[1], backend=backend.name).cpu()
    assert got.dtype == torch.float32 and got.shape == expert.shape
    ref64 = reference.contrastive_logits(expert, amateur, alpha, plausibility)
    ref32 = reference.contrastive_logits(expert, amateur, alpha, plausibility, torch.float32)
    assert torch.equal(got.isnan(), ref64.isnan())
    assert torch.equal(got == -math.inf, ref64 == -math.inf), "plausible sets differ"
    assert torch.equal(got == math.inf, ref64 == math.inf)
    finite = ref64.isfinite()
    reference.assert_close_2x(got[finite], ref64[finite], ref32[finite], atol=1e-5)
    return got


@pytest.mark.parametrize(*cases(SPACE))
def test_matches_reference(backend, vocab, batch, expert_dtype, amateur_dtype, alpha,
                           plausibility):
    if backend.interpreted:
        vocab = min(vocab, 1000)
    g = torch.Generator().manual_seed(vocab * 31 + batch)
    expert = random_logits(batch, vocab, expert_dtype, generator=g)
    amateur = random_logits(batch, vocab, amateur_dtype, generator=g)
    got = _check(backend, expert, amateur, _param("alpha", alpha, batch),
                 _param("plausibility", plausibility, batch))
    assert got.isfinite().any(-1).all()  # the expert's argmax is always plausible


def test_non_finite_rows(backend):
    """NaN / +inf / nothing finite in either model: NaN rows; -inf logits: never plausible;
    an amateur -inf on a plausible token: +inf. Other rows are unaffected."""
    vocab = 300 if backend.interpreted else 5000
    expert = random_logits(9, vocab, torch.float32)
    amateur = random_logits(9, vocab, torch.float32)
    expert[0, 17] = math.nan
    amateur[1, -1] = math.nan  # in the last, partial chunk
    expert[2, 5] = math.inf
    amateur[3, 3] = math.inf
    expert[4] = -math.inf
    amateur[5] = -math.inf
    expert[6, :-2] = -math.inf  # two finite tokens left
    top = int(expert[7].argmax())
    amateur[7, top] = -math.inf
    expert[8, ::2] = -math.inf
    got = _check(backend, expert, amateur, 0.5, 0.0)
    assert got[:6].isnan().all() and not got[6:].isnan().any()
    assert (got[6, :-2] == -math.inf).all() and got[6, -2:].isfinite().all()
    assert got[7, top] == math.inf
    assert (got[8, ::2] == -math.inf).all() and got[8, 1::2].isfinite().all()


def test_inputs_are_not_modified(backend):
    expert = random_logits(3, 100, torch.bfloat16).to(backend.device)
    amateur = random_logits(3, 100, torch.float32).to(backend.device)
    before = expert.clone(), amateur.clone()
    ops.contrastive_logits(expert, amateur, alpha=1.0, plausibility=0.1, backend=backend.name)
    assert torch.equal(expert, before[0]) and torch.equal(amateur, before[1])


def test_float64_and_strided_inputs(backend):
    """float64 is computed in float32 like the other ops; a transposed view is read correctly."""
    expert = random_logits(50, 4, torch.float64).T
    amateur = random_logits(4, 50, torch.float64)
    _check(backend, expert.float(), amateur.float(), 0.3, 0.05)
    got = ops.contrastive_logits(expert.to(backend.device), amateur.to(backend.device),
                                 alpha=0.3, plausibility=0.05, backend=backend.name).cpu()
    want = reference.contrastive_logits(expert.float(), amateur.float(), 0.3, 0.05)
    assert torch.equal(got == -math.inf, want == -math.inf)


@pytest.mark.parametrize("change, error, message", [
    (dict(alpha=-0.1), ValueError, r"alpha must be in \[0, 1e6\]"),
    (dict(alpha=math.nan), ValueError, r"alpha must be"),
    (dict(alpha=2e6), ValueError, r"alpha must be"),
    (dict(alpha=torch.tensor([0.0, -1.0, 0.0])), ValueError, r"alpha must be .*row 1"),
    (dict(alpha=torch.ones(2)), ValueError, r"alpha must be a number or a \[3\] tensor"),
    (dict(alpha=True), TypeError, r"alpha must be a number"),
    (dict(plausibility=1.5), ValueError, r"plausibility must be in \[0, 1\]"),
    (dict(plausibility=torch.tensor([0.1, 0.1, -0.5])), ValueError, r"plausibility.*row 2"),
    (dict(amateur_logits=torch.randn(3, 49)), ValueError, r"amateur_logits must have the shape"),
    (dict(expert_logits=torch.randn(3)), ValueError, r"expert_logits must be \[num_seqs"),
    (dict(expert_logits=torch.ones(3, 50, dtype=torch.long)), TypeError, r"expert_logits"),
    (dict(amateur_logits=torch.randn(3, 50, device="meta")), ValueError, r"amateur_logits"),
])
def test_invalid_arguments_name_the_argument(change, error, message):
    args = dict(expert_logits=torch.randn(3, 50), amateur_logits=torch.randn(3, 50), alpha=1.0,
                plausibility=0.1)
    args.update(change)
    with pytest.raises(error, match=message):
        ops.contrastive_logits(**args)
