"""Per-request sampling parameters and the per-step output record of the Engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def _check(name: str, ok: bool, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How one request is decoded; semantics are those of ``model.generate``.

    temperature 0 means greedy (argmax of the penalised logits). ``seed`` makes the request's
    draws a pure function of (seed, position), independent of its batchmates; without it the
    draws come from torch's global RNG. ``stop_token_ids`` end the request like EOS (the token
    is kept in the output). ``ignore_eos`` keeps generating through EOS; ``min_new_tokens``
    forbids EOS and the stop ids until that many tokens were generated.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        m = self.max_new_tokens
        _check("max_new_tokens", _is_int(m) and m >= 1, "an integer >= 1", m)
        m = self.min_new_tokens
        _check("min_new_tokens", _is_int(m) and 0 <= m <= self.max_new_tokens,
               f"an integer in [0, max_new_tokens={self.max_new_tokens}]", m)
        t = self.temperature
        _check("temperature", _is_number(t) and 0 <= t < float("inf"),
               "a finite number >= 0 (0 = greedy)", t)
        _check("top_k", _is_int(self.top_k), "an integer (<= 0 disables it)", self.top_k)
        p = self.top_p
        _check("top_p", _is_number(p) and 0 < p <= 1, "in (0, 1]", p)
        p = self.min_p
        _check("min_p", _is_number(p) and 0 <= p <= 1, "in [0, 1]", p)
        r = self.repetition_penalty
        _check("repetition_penalty", _is_number(r) and 0 < r < float("inf"),
               "a finite number > 0 (1 disables it)", r)
        s = self.seed
        _check("seed", s is None or (_is_int(s) and 0 <= s < 2**63),
               "None or an integer in [0, 2**63)", s)
        ids = self.stop_token_ids
        _check("stop_token_ids",
               ids is None or all(_is_int(i) and i >= 0 for i in ids),
               "None or a list of token ids >= 0", ids)
        if ids is not None:
            self.stop_token_ids = list(ids)
        _check("ignore_eos", isinstance(self.ignore_eos, bool), "a bool", self.ignore_eos)


@dataclass
class RequestOutput:
    """What one ``Engine.step()`` reports for a request.

    output_ids: every generated token so far (not the prompt), including the EOS / stop token that
    finished the request; new_ids: the tokens this step added. finish_reason: None while
    running, then "stop" (EOS or a stop id), "length" (max_new_tokens or the model's context),
    "abort" or "error" (the sampler found no finite logit).
    """

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: Optional[str] = None
