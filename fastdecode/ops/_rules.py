"""The valid range of every sampling parameter, in one table.

The ops' per-row validation (:mod:`fastdecode.ops._params`), :class:`fastdecode.SamplingParams`
and the command line all check values here, so that what one accepts the others accept too, with
the same message (the parameter, the allowed range, the value).

The ranges are the ops' contract, narrowed only where a value would not survive the float32 the
kernels compute in: a temperature or repetition penalty outside float32's normal range would
become 0 or inf inside the kernel (then ``1 / 0`` or ``0 * inf``: NaN rows), so it is rejected.
A top_k beyond int64 keeps its documented meaning (>= vocab_size: off).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 2.0 ** -126  # smallest normal float32; 1 / FLOAT32_TINY is still finite
_FLOAT32_RANGE = f"[{FLOAT32_TINY:.8g}, {FLOAT32_MAX:.8g}] (float32's normal range)"
_INT64_END = 2 ** 63

Number = Union[int, float]


@dataclass(frozen=True)
class Rule:
    """``low <= value <= high`` (``<`` where open) or ``value == also``; whole if ``integer``."""

    name: str
    allowed: str  # the range in words, as error messages quote it
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    also: Optional[float] = None  # one value allowed outside [low, high]: temperature 0 = greedy

    def holds(self, x):
        """Whether ``x`` is in range: a Python number -> bool, a float64 tensor -> bool mask.
        NaN is never in range."""
        ok = (x > self.low if self.low_open else x >= self.low) & (
            x < self.high if self.high_open else x <= self.high)
        return ok if self.also is None else ok | (x == self.also)


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("temperature", f">= 0 (0 = greedy), and if not 0 in {_FLOAT32_RANGE}",
         low=FLOAT32_TINY, high=FLOAT32_MAX, also=0.0),
    Rule("top_k", "an integer (<= 0 or >= vocab_size: off)", low_open=True, high_open=True,
         integer=True),
    Rule("top_p", "in (0, 1] (1: off)", low=0.0, high=1.0, low_open=True),
    Rule("min_p", "in [0, 1] (0: off)", low=0.0, high=1.0),
    Rule("repetition_penalty", f"> 0 (1: off), in {_FLOAT32_RANGE}", low=FLOAT32_TINY,
         high=FLOAT32_MAX),
    # Contrastive decoding: the amateur's weight (finite in float32: alpha * log p must not
    # overflow to inf) and the expert's plausibility threshold.
    Rule("contrastive_alpha", "in [0, 1e6] (0: the expert alone)", low=0.0, high=1e6),
    Rule("plausibility", "in [0, 1] (0: every token the expert gives mass)", low=0.0, high=1.0),
    Rule("seed", "an integer in [0, 2**63)", low=0, high=_INT64_END, high_open=True,
         integer=True),
    Rule("max_new_tokens", "an integer >= 1", low=1, high_open=True, integer=True),
    Rule("min_new_tokens", "an integer >= 0", low=0, high_open=True, integer=True),
)}


def check(name: str, value, *, label: Optional[str] = None, where: str = "") -> Number:
    """Check one scalar against ``RULES[name]``; return it as the kernels take it.

    Integer parameters accept ints and integral floats and return an int; the others accept
    any real number and return a float. bool is refused (``True`` is not a temperature).
    Raises ValueError ``"{label} must be {allowed}; got {value!r}{where}"``; ``label`` defaults
    to ``name`` (e.g. ``"SamplingParams.top_p"`` or ``"--top-p"`` for other callers).
    """
    rule = RULES[name]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and rule.integer and not isinstance(value, numbers.Integral):
        ok = math.isfinite(value) and float(value).is_integer()
    # Compared before any conversion: float(10**400) would overflow, a huge int compares fine.
    if not (ok and rule.holds(value)):
        raise ValueError(f"{label or name} must be {rule.allowed}; got {short_repr(value)}"
                         f"{where}")
    return int(value) if rule.integer else float(value)


def short_repr(value) -> str:
    """``repr`` kept short: a caller's value may be a 10**5000 (whose repr even raises) or a
    megabyte string."""
    if isinstance(value, numbers.Integral) and not -2**64 < value < 2**64:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_rows(name: str, values: torch.Tensor, *, label: Optional[str] = None) -> None:
    """Check a ``[B]`` tensor of per-row values against ``RULES[name]`` (on a host copy).

    Raises ValueError naming the first bad row.
    """
    rule = RULES[name]
    host = values.detach().to("cpu", torch.float64)
    ok = rule.holds(host)
    if rule.integer and values.is_floating_point():
        ok &= host == host.round()
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        raise ValueError(f"{label or name} must be {rule.allowed}; got {values[row].item()} "
                         f"at row {row}")

