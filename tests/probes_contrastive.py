"""Reliability probes of ``contrastive_logits``: mismatched or degenerate shapes, mistyped and
out-of-range parameters, tensors on another device (all must raise before any kernel runs), valid
edge cases with their documented results, and direct ``torch.ops.fastdecode`` calls."""

from __future__ import annotations

import math

import torch

import fastdecode.ops as ops
from probe_kit import Target, probe, rejects

CONTRASTIVE = "contrastive_logits inputs"
DIRECT = "direct torch.ops calls"
B, V = 3, 50


def call(t: Target, **change) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    args = dict(expert_logits=(3 * torch.randn(B, V, generator=g)).to(t.device),
                amateur_logits=(3 * torch.randn(B, V, generator=g)).to(t.device),
                alpha=0.5, plausibility=0.1)
    args.update({k: v(t) if callable(v) else v for k, v in change.items()})
    return ops.contrastive_logits(**args, backend=t.backend)


for name, change, exc, words in (
        ("vocab_mismatch", dict(amateur_logits=lambda t: torch.randn(B, V + 1, device=t.device)),
         ValueError, ("amateur_logits", "shape")),
        ("batch_mismatch", dict(amateur_logits=lambda t: torch.randn(B + 1, V, device=t.device)),
         ValueError, ("amateur_logits",)),
        ("expert_3d", dict(expert_logits=lambda t: torch.randn(B, V, 1, device=t.device)),
         ValueError, ("expert_logits",)),
        ("vocab_zero", dict(expert_logits=lambda t: torch.randn(B, 0, device=t.device),
                            amateur_logits=lambda t: torch.randn(B, 0, device=t.device)),
         ValueError, ("vocab_size",)),
        ("expert_int", dict(expert_logits=lambda t: torch.ones(B, V, dtype=torch.int32,
                                                               device=t.device)),
         TypeError, ("expert_logits",)),
        ("amateur_on_meta", dict(amateur_logits=lambda t: torch.randn(B, V, device="meta")),
         ValueError, ("amateur_logits is on meta",)),
        ("alpha_on_meta", dict(alpha=lambda t: torch.ones(B, device="meta")), ValueError,
         ("alpha is on meta",)),
        ("alpha_negative", dict(alpha=-1.0), ValueError, ("alpha must be in [0, 1e6]",)),
        ("alpha_inf", dict(alpha=math.inf), ValueError, ("alpha",)),
        ("alpha_nan_row", dict(alpha=lambda t: torch.tensor([0.0, math.nan, 1.0],
                                                            device=t.device)),
         ValueError, ("alpha", "row 1")),
        ("alpha_string", dict(alpha="1"), TypeError, ("alpha",)),
        ("plausibility_above_one", dict(plausibility=1.01), ValueError, ("plausibility",)),
        ("plausibility_shape", dict(plausibility=lambda t: torch.ones(B + 1, device=t.device)),
         ValueError, ("plausibility must be a number or a [3] tensor",))):
    rejects(f"contrastive_{name}", CONTRASTIVE, lambda t, c=change: call(t, **c), exc, *words)


@probe(CONTRASTIVE)
def contrastive_edge_values(t: Target) -> None:
    """One row, one token: score 0 (log 1 - alpha log 1); every dtype pair runs; a NaN row stays
    NaN while its batchmates are finite."""
    one = torch.zeros(1, 1, device=t.device)
    assert call(t, expert_logits=one, amateur_logits=one).item() == 0.0
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = call(t, expert_logits=lambda t, d=dtype: torch.randn(B, V, device=t.device).to(d))
        assert out.dtype == torch.float32 and out.isfinite().any(-1).all()
    expert = torch.randn(B, V, device=t.device)
    expert[1, 3] = math.nan
    out = call(t, expert_logits=expert).cpu()
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


def direct(t: Target, **change) -> torch.Tensor:
    a = dict(expert=torch.randn(B, V, device=t.device), amateur=torch.randn(B, V, device=t.device),
             alpha=torch.full((B,), 0.5, device=t.device),
             plausibility=torch.full((B,), 0.1, device=t.device))
    a.update({k: v(a) for k, v in change.items()})
    return torch.ops.fastdecode.contrastive_logits(a["expert"], a["amateur"], a["alpha"],
                                                   a["plausibility"])


for name, change, words in (
        ("alpha_float64", dict(alpha=lambda a: a["alpha"].double()), "alpha must be Float"),
        ("alpha_rows", dict(alpha=lambda a: a["alpha"][:2]), "alpha must have shape"),
        ("alpha_negative", dict(alpha=lambda a: a["alpha"] - 1), "alpha must be in [0, 1e6]"),
        ("plausibility_nan", dict(plausibility=lambda a: a["plausibility"] * math.nan),
         "plausibility must be in [0, 1]"),
        ("vocab_mismatch", dict(amateur=lambda a: a["amateur"][:, :7]), "amateur_logits"),
        ("expert_int64", dict(expert=lambda a: a["expert"].long()), "expert_logits"),
        ("vocab_zero", dict(expert=lambda a: a["expert"][:, :0],
                            amateur=lambda a: a["amateur"][:, :0]), "vocab_size")):
    rejects(f"direct_contrastive_{name}", DIRECT, lambda t, c=change: direct(t, **c),
            (ValueError, TypeError), words, backends=("cpu",))
