"""Per-request sampling parameters and the per-step output record of the Engine."""

from __future__ import annotations

import numbers
from collections import abc
from dataclasses import dataclass, field
from typing import Iterable, Optional

from fastdecode.ops import _rules


def _checked(name: str, value):
    return _rules.check(name, value, label=f"SamplingParams.{name}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded; semantics are those of ``model.generate``.

    temperature 0 means greedy (argmax of the penalised logits). ``seed`` makes the request's
    draws a pure function of (seed, position), independent of its batchmates; without it the
    draws come from torch's global RNG. ``stop_token_ids`` end the request like EOS (the token
    is kept in the output). ``ignore_eos`` keeps generating through EOS; ``min_new_tokens``
    forbids EOS and the stop ids until that many tokens were generated.
    ``no_repeat_ngram_size`` (0 = off) and ``bad_words_ids`` (token sequences, multi-token
    too) are HF's processors over the request's prompt + generated ids.

    Speculative decoding (prompt lookup, as ``model.generate``'s): ``prompt_lookup_num_tokens``
    (0 = off) draft tokens are copied each decode step from what followed an earlier
    occurrence of the request's last n-gram (``max_matching_ngram_size`` tokens at most) and
    verified in the step's forward pass. The output is the one the request gets without it
    (greedy: token for token; sampled: the same distribution, and the same tokens with a
    ``seed``), in fewer steps when drafts are accepted. With a draft model given to the Engine
    (``Engine(model, draft_model=small)``), ``num_speculative_tokens`` (0 = off) draft tokens
    come from it instead (greedy drafts; not with a repetition penalty, n-gram blocking or bad
    words). At most one of the two may be set.

    Immutable (assigning a field raises ``dataclasses.FrozenInstanceError``; derive a variant
    with ``dataclasses.replace``) and validated at construction against the same ranges as
    ``ops.sample`` (:mod:`fastdecode.ops._rules`): a ValueError names the field and its range.
    Numbers are stored as the kernels take them (``temperature=1`` becomes ``1.0``;
    ``stop_token_ids`` a tuple). Stop ids are checked against the model's vocabulary by
    ``Engine.add_request``.
    """

    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[tuple[int, ...]] = None
    ignore_eos: bool = False
    no_repeat_ngram_size: int = 0
    bad_words_ids: Optional[tuple[tuple[int, ...], ...]] = None
    prompt_lookup_num_tokens: int = 0
    max_matching_ngram_size: int = 2
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p",
                     "min_p", "repetition_penalty"):
            object.__setattr__(self, name, _checked(name, getattr(self, name)))
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"SamplingParams.min_new_tokens must be an integer in "
                             f"[0, max_new_tokens={self.max_new_tokens}]; got "
                             f"{self.min_new_tokens}")
        if self.seed is not None:
            object.__setattr__(self, "seed", _checked("seed", self.seed))
        object.__setattr__(self, "stop_token_ids", _stop_ids(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool; got "
                             f"{self.ignore_eos!r}")
        n = self.no_repeat_ngram_size
        if not _is_int(n) or n < 0:
            raise ValueError(f"SamplingParams.no_repeat_ngram_size must be an integer >= 0 "
                             f"(0 = off); got {_rules.short_repr(n)}")
        object.__setattr__(self, "bad_words_ids", _bad_words(self.bad_words_ids))
        for name, low, note in (("prompt_lookup_num_tokens", 0, " (0 = off)"),
                                ("max_matching_ngram_size", 1, ""),
                                ("num_speculative_tokens", 0, " (0 = off)")):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"SamplingParams.{name} must be an integer >= {low}{note}; "
                                 f"got {_rules.short_repr(value)}")
            object.__setattr__(self, name, int(value))
        if self.prompt_lookup_num_tokens and self.num_speculative_tokens:
            raise ValueError("SamplingParams: set at most one of prompt_lookup_num_tokens and "
                             "num_speculative_tokens")
        history = (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size
                   or self.bad_words_ids)
        if self.num_speculative_tokens and history:
            raise ValueError("SamplingParams.num_speculative_tokens cannot be combined with "
                             "repetition_penalty, no_repeat_ngram_size or bad_words_ids")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bad_words(words) -> Optional[tuple[tuple[int, ...], ...]]:
    if words is None:
        return None
    try:
        values = tuple(tuple(w) for w in words)
    except TypeError:
        values = None
    if not values or not all(w and all(_is_int(t) and t >= 0 for t in w) for w in values):
        raise ValueError(f"SamplingParams.bad_words_ids must be None or a non-empty list of "
                         f"non-empty lists of token ids >= 0; got {_rules.short_repr(words)}")
    return tuple(tuple(int(t) for t in w) for w in values)


def _stop_ids(ids: Optional[Iterable[int]]) -> Optional[tuple[int, ...]]:
    if ids is None:
        return None
    values = (tuple(ids) if isinstance(ids, Iterable) and not isinstance(ids, (str, bytes))
              else None)
    if values is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                 and i >= 0 for i in values):
        raise ValueError(f"SamplingParams.stop_token_ids must be None or a list of token ids "
                         f">= 0; got {_rules.short_repr(ids)}")
    return tuple(int(i) for i in values)


class TokenView(abc.Sequence):
    """A read-only view of ``tokens[start:stop]`` of a list that only ever grows: what a step
    reports costs nothing however long the request is (no copy of its tokens). Compares equal
    to a list of the same ids; ``list(view)`` copies."""

    __slots__ = ("_tokens", "_start", "_stop")

    def __init__(self, tokens: list[int], start: int, stop: int) -> None:
        self._tokens, self._start, self._stop = tokens, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._tokens[self._start + i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("TokenView index out of range")
        return self._tokens[self._start + index]

    def __eq__(self, other) -> bool:
        if isinstance(other, (TokenView, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self[:])


@dataclass
class RequestOutput:
    """What one ``Engine.step()`` reports for a request.

    output_ids: every generated token so far (not the prompt), including the EOS / stop token that
    finished the request, as a read-only :class:`TokenView` (a sequence; ``list()`` copies it);
    new_ids: the tokens this step added. finish_reason: None while
    running, then "stop" (EOS or a stop id), "length" (max_new_tokens or the model's context),
    "abort" or "error". error: with "error", what went wrong, naming the request id (e.g. the
    sampler found no finite logit); None otherwise.
    """

    request_id: str
    prompt_ids: list[int]
    output_ids: abc.Sequence
    new_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
