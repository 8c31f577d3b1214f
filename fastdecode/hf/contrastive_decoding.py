"""Contrastive decoding with an amateur model (Li et al., 2023; O'Brien & Lewis, 2023).

Each step runs the model (the expert) and a smaller ``amateur_model`` of the same vocabulary, each
on its own cache, once; the token is then chosen from

    s(x) = log p_expert(x) - alpha * log p_amateur(x)  if p_expert(x) >= plausibility * max p_expert
    s(x) = -inf                                        otherwise

by the call's usual selection (greedy argmax, or sampling with its temperature / top-k / top-p /
min-p and processors applied to ``s``). Options of ``fastdecode.generate``: ``amateur_model``,
``contrastive_alpha`` (alpha >= 0, default 0.1) and ``plausibility`` (in [0, 1], default 0.1).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from fastdecode import ops

from fastdecode.hf.prepare import Prepared
from fastdecode.hf.runner import has_unsupported_attention, uses_attention_interface
from fastdecode.hf.steppers import PagedStepper


@dataclass
class Contrast:
    """The options of one contrastive-decoding call (validated)."""

    amateur: object
    alpha: float = 0.1
    plausibility: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha >= 0):
            raise ValueError(f"contrastive_alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (isinstance(self.plausibility, (int, float)) and 0 <= self.plausibility <= 1):
            raise ValueError(f"plausibility must be in [0, 1], got {self.plausibility!r}")
        if not uses_attention_interface(self.amateur) or has_unsupported_attention(self.amateur):
            raise ValueError(f"amateur_model {type(self.amateur).__name__} cannot run on the "
                             "paged cache (its attention does not go through AttentionInterface "
                             "or uses sinks / cross-attention)")


def pop_options(kwargs: dict) -> Optional[Contrast]:
    """Take the contrastive-decoding options out of ``generate``'s keyword arguments (None when
    no ``amateur_model`` is given; the other two alone are an error)."""
    amateur = kwargs.pop("amateur_model", None)
    extra = {k: kwargs.pop(k) for k in ("contrastive_alpha", "plausibility") if k in kwargs}
    if amateur is None:
        if extra:
            raise ValueError(f"{', '.join(extra)} need amateur_model")
        return None
    return Contrast(amateur, **{("alpha" if k == "contrastive_alpha" else k): v
                                for k, v in extra.items()})


def contrastive_logits(expert: torch.Tensor, amateur: torch.Tensor, *, alpha: float,
                       plausibility: float) -> torch.Tensor:
    """expert, amateur: [B, V] logits -> [B, V] float32 contrastive scores (formula above), by
    the fused ``ops.contrastive_logits``."""
    if expert.shape != amateur.shape:
        raise ValueError(f"amateur_model's logits {tuple(amateur.shape)} do not match the "
                         f"model's {tuple(expert.shape)}: the vocabularies must be the same")
    return ops.contrastive_logits(expert, amateur, alpha=alpha, plausibility=plausibility)


class ContrastStepper:
    """Wraps the call's stepper (the expert's) with the amateur's paged stepper: both advance
    once per token, and the loop sees the contrastive scores as the step's logits."""

    def __init__(self, expert, prepared: Prepared, max_new_tokens: int, contrast: Contrast,
                 backend: str):
        self.expert, self.contrast = expert, contrast
        # The amateur reads the same prompt at the default positions (mask.cumsum - 1).
        self.amateur = PagedStepper(contrast.amateur, replace(prepared, model_kwargs={}),
                                    max_new_tokens, backend=backend)

    @property
    def hidden_states(self):
        return self.expert.hidden_states

    @contextmanager
    def session(self) -> Iterator[None]:
        with self.expert.session(), self.amateur.session():
            yield

    def _combine(self, expert: torch.Tensor, amateur: torch.Tensor) -> torch.Tensor:
        return contrastive_logits(expert, amateur.to(expert.device), alpha=self.contrast.alpha,
                                  plausibility=self.contrast.plausibility)

    def prefill(self) -> torch.Tensor:
        return self._combine(self.expert.prefill(), self.amateur.prefill())

    def decode(self, tokens: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        return self._combine(self.expert.decode(tokens, sequences),
                             self.amateur.decode(tokens, sequences))

    def cache(self):
        return self.expert.cache()
