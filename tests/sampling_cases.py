"""Shared helpers of the sampling tests: random logits, per-row parameters, and the comparison of
processed scores against the float64 reference with a float-rounding margin at filter
boundaries."""

from __future__ import annotations

import math
from typing import Optional

import torch

import reference
from fastdecode.ops import torch_backend

# Relative width of the filter boundaries inside which float32 rounding may flip a token: top-p
# compares accumulated probability mass (absolute error ~1e-6 at vocab 1e5), min-p compares
# exp(x - max) against min_p.
TOP_P_MARGIN = 1e-5
MIN_P_MARGIN = 1e-4
# Probabilities whose top-p boundary falls exactly on a token group (the mass above it equals
# top_p): transformers' warper drops that group, and every backend must agree with it.
EXACT_BOUNDARIES = [([0.3, 0.1, 0.1, 0.5], 0.8), ([0.25, 0.25, 0.5], 0.5),
                    ([0.4, 0.35, 0.25], 0.75), ([0.125] * 4 + [0.5], 0.5)]


def random_logits(batch: int, vocab: int, dtype: torch.dtype, scale: float = 3.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[batch, vocab] logits spread so that every filter has work, without exact ties in float32
    (random draws in bf16 / fp16 may tie: ties are part of what is tested)."""
    return (torch.randn(batch, vocab, generator=generator) * scale).to(dtype)


def seen_tokens(batch: int, vocab: int, length: int) -> torch.Tensor:
    """[batch, length] int64 ids with duplicates and -1 padding at the end of some rows."""
    seen = torch.randint(0, vocab, (batch, length))
    seen[:, length // 2:] = seen[:, : length - length // 2].clone()  # ids repeated
    if length > 1:
        seen[::2, -1] = -1
    return seen


def per_row(values: list, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch] tensor cycling through ``values`` (mixes e.g. greedy and sampled rows)."""
    return torch.tensor([values[i % len(values)] for i in range(batch)], dtype=dtype)


def _shift(x, delta, lo, hi):
    if isinstance(x, torch.Tensor):
        return (x.double() + delta(x.double())).clamp(lo, hi)
    return min(max(x + delta(x), lo), hi)


def assert_processed_matches(out: torch.Tensor, logits: torch.Tensor, **params) -> None:
    """``out`` [B, V] float32 equals the float64 reference: the same scores where kept (within
    twice the error of plain float32 processing), -inf where filtered, except that a token within
    the float-rounding margin of a top-p / min-p boundary may fall either way (checked by
    bracketing: the reference with looser filters keeps at least what ``out`` keeps, the one with
    tighter filters at most)."""
    top_p, min_p = params.get("top_p", 1.0), params.get("min_p", 0.0)
    loose = reference.process_logits(
        logits, **{**params, "top_p": _shift(top_p, lambda p: TOP_P_MARGIN, 0.0, 1.0),
                   "min_p": _shift(min_p, lambda m: -MIN_P_MARGIN * m, 0.0, 1.0)})
    tight = reference.process_logits(
        logits, **{**params, "top_p": _shift(top_p, lambda p: -TOP_P_MARGIN * (p < 1), 1e-12, 1.0),
                   "min_p": _shift(min_p, lambda m: MIN_P_MARGIN * m, 0.0, 1.0)})
    assert out.dtype == torch.float32 and out.shape == logits.shape
    kept = out > -math.inf
    assert not (kept & (loose == -math.inf)).any(), "kept a token the reference filters"
    assert not (~kept & (tight > -math.inf)).any(), "filtered a token the reference keeps"
    assert kept.any(-1).all() or not torch.isfinite(logits.float()).any(), "a row lost every token"
    lowp = _float32_scores(logits, params)
    ref = loose[kept]
    reference.assert_close_2x(out[kept], ref, lowp[kept], atol=1e-6, name="processed scores")


def _float32_scores(logits, params) -> torch.Tensor:
    """Penalised, tempered scores computed by plain float32 torch (the error baseline)."""
    batch = logits.shape[0]
    def rows(x, default):
        x = params.get(x, default)
        return x.float() if isinstance(x, torch.Tensor) else torch.full((batch,), float(x))
    scores = torch_backend.apply_repetition_penalty(
        logits, params.get("seen_tokens"), rows("repetition_penalty", 1.0))
    temp = rows("temperature", 1.0)
    return scores / torch.where(temp > 0, temp, 1.0)[:, None]
