"""A step's sampling parameters and the one sampling call that uses them.

The values were checked on the host when they were made (``SamplingParams`` and ``generate``
check them against :mod:`fastdecode.ops._rules`), so nothing here reads a device tensor back:
parameters shared by every row are cached constants, per-row ones ride in the step's staging
buffer (one upload with the rest of the plan), and :class:`Sampler` calls the backend's run
function directly (resolved once per model).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Optional, Protocol, Sequence

import torch

from fastdecode.engine.params import SamplingParams
from fastdecode.ops import _backends, _rules
from fastdecode.ops._params import SamplingTensors, from_host, seeds_and_offsets
from fastdecode.plan.staging import Staging

# Staging fields a sampling step may use (StepPlanner's extra_fields).
FIELDS = {"temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32,
          "min_p": torch.float32, "repetition_penalty": torch.float32, "seeds": torch.int64,
          "offsets": torch.int64, "banned": torch.int64, "seen": torch.int64}
_PER_ROW = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


class RowParams(Protocol):
    """What a row's parameters provide (``SamplingParams`` does)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: Optional[int]


@dataclass
class SamplingBatch:
    """Parameters of S rows. seeds, offsets: [S] int64 (seed < 0: a fresh draw from torch's
    RNG), or None for every row; banned: ([K] rows, [K] token ids) forced to -inf first (the
    min-new-tokens rule), or None; banned_host: the same pairs on the host; errors: rows
    whose parameters break :mod:`fastdecode.ops._rules` (sampled with neutral ones: their
    tokens must be dropped), with why."""

    params: SamplingTensors
    seeds: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    banned: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    banned_host: list[tuple[int, int]] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.params.temperature.shape[0]

    def row(self, j: int) -> "SamplingBatch":
        """Row ``j`` alone (views, and its banned tokens)."""
        pick = slice(j, j + 1)
        p = self.params
        params = replace(p, temperature=p.temperature[pick], top_k=p.top_k[pick],
                         top_p=p.top_p[pick], min_p=p.min_p[pick],
                         repetition_penalty=p.repetition_penalty[pick],
                         seen_tokens=None if p.seen_tokens is None else p.seen_tokens[pick])
        mine = [(0, t) for r, t in self.banned_host if r == j]
        banned = None
        if mine:
            dev = p.temperature.device
            banned = (torch.zeros(len(mine), dtype=torch.int64, device=dev),
                      torch.tensor([t for _, t in mine], dtype=torch.int64, device=dev))
        return SamplingBatch(params, None if self.seeds is None else self.seeds[pick],
                             None if self.offsets is None else self.offsets[pick], banned, mine,
                             {0: self.errors[j]} if j in self.errors else {})


# Stands in for a row whose own parameters break the rules.
_NEUTRAL = SamplingParams(temperature=0.0)


def rule_error(p: RowParams) -> Optional[str]:
    """Why ``p`` breaks :mod:`fastdecode.ops._rules`, or None."""
    try:
        for name in _PER_ROW:
            _rules.check(name, getattr(p, name))
        if p.seed is not None:
            _rules.check("seed", p.seed)
    except ValueError as exc:
        return str(exc)
    return None


class Sampler:
    """Draws tokens for a model's steps on ``device`` with a vocabulary of ``vocab_size``."""

    def __init__(self, vocab_size: int, device, backend: str = "auto") -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._impl = _backends.resolve(backend, "sample", self.device)
        self._valid: set[tuple] = set()  # parameter values known to pass the rules

    def _check(self, p: RowParams) -> Optional[str]:
        """:func:`rule_error`, each set of values checked once."""
        values = tuple(getattr(p, name) for name in _PER_ROW) + (p.seed,)
        try:
            if values in self._valid:
                return None
        except TypeError:  # an unhashable value: rule_error refuses it
            pass
        why = rule_error(p)
        if why is None:
            if len(self._valid) > 4096:
                self._valid.clear()
            self._valid.add(values)
        return why

    def shared(self, batch: int, p: RowParams, seen_tokens: Optional[torch.Tensor] = None
               ) -> SamplingBatch:
        """Every row with the same parameters ``p``, drawing from torch's RNG (seed ignored).
        seen_tokens: [batch, L] ids for the repetition penalty (-1 = padding)."""
        return SamplingBatch(self._tensors(batch, [p], None, seen_tokens))

    def stage(self, staging: Staging, params: Sequence[RowParams], offsets: Sequence[int],
              history: Optional[Sequence[Sequence[int]]] = None,
              banned: Sequence[tuple[int, int]] = ()) -> SamplingBatch:
        """Rows with their own parameters, written into ``staging`` (call before its upload;
        the tensors are valid after it). offsets: each row's draw offset (its position);
        history: each row's ids so far, read only for rows with a repetition penalty;
        banned: (row, token id) pairs to forbid."""
        rows = len(params)
        errors = {}
        for i, p in enumerate(params):
            if i == 0 or p is not params[i - 1]:
                why = self._check(p)
            if why is not None:
                errors[i] = why
        if errors:
            params = [_NEUTRAL if i in errors else p for i, p in enumerate(params)]
        seeded = any(p.seed is not None for p in params)
        penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        width = max((len(history[i]) for i in penalised), default=0) if history else 0
        staging.reserve(**{name: rows for name in _PER_ROW}, seeds=rows, offsets=rows,
                        seen=rows * width, banned=2 * len(banned))
        if seeded:
            staging.host("seeds", rows)[:] = [-1 if p.seed is None else p.seed for p in params]
            staging.host("offsets", rows)[:] = offsets
        if width:
            host = staging.host("seen", rows * width).reshape(rows, width)
            host.fill(-1)
            for i in penalised:
                host[i, :len(history[i])] = history[i]
        if banned:
            staging.host("banned", 2 * len(banned))[:] = list(itertools.chain(*zip(*banned)))
        tensors = self._tensors(rows, params, staging,
                                staging.device_view("seen", rows * width).view(rows, width)
                                if width else None)
        ban = None
        if banned:
            dev = staging.device_view("banned", 2 * len(banned))
            ban = (dev[:len(banned)], dev[len(banned):])
        return SamplingBatch(tensors, staging.device_view("seeds", rows) if seeded else None,
                             staging.device_view("offsets", rows) if seeded else None, ban,
                             list(banned), errors)

    def _tensors(self, rows: int, params: Sequence[RowParams], staging: Optional[Staging],
                 seen: Optional[torch.Tensor]) -> SamplingTensors:
        one = len(params) == 1 or all(p is params[0] for p in params)

        def values(name: str):
            return getattr(params[0], name) if one else [getattr(p, name) for p in params]

        def upload(name: str, vals: list, dtype: torch.dtype) -> torch.Tensor:
            staging.host(name, rows)[:] = vals
            return staging.device_view(name, rows)

        return from_host(rows, self.vocab_size, self.device, temperature=values("temperature"),
                         top_k=values("top_k"), top_p=values("top_p"), min_p=values("min_p"),
                         repetition_penalty=values("repetition_penalty"), seen_tokens=seen,
                         upload=None if staging is None else upload)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits: [S, V] float32 (the banned entries are set to -inf in place) -> [S] int64
        token ids; -1 for a row with NaN or no finite logit left."""
        if batch.banned is not None:
            logits.index_put_(batch.banned, logits.new_full((), float("-inf")))
        seeds, offsets = seeds_and_offsets(logits.shape[0], logits.device, batch.seeds,
                                           batch.offsets, None)
        return self._impl.sample(logits, batch.params, seeds, offsets)
