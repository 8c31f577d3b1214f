"""Validation and normalisation of the sampling parameters shared by every backend.

Public sampling ops accept each parameter as a Python number (all rows) or a ``[B]`` tensor
(per row). Backends receive a :class:`SamplingTensors`: one ``[B]`` tensor per parameter on the
logits' device, in a fixed dtype, already validated against the ranges of
:mod:`fastdecode.ops._rules` (the table SamplingParams and the command line check too).

A number shared by every row never becomes a new tensor per call: it is a cached constant
(:func:`constant`) and the ``has_*`` flags it sets let kernels skip whole stages. Callers that
checked their values on the host already (the step plan of the Engine and ``generate``) build
the tensors with :func:`from_host` and call the backend directly: no device-to-host copy, no
second validation.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from fastdecode.ops import _rules

Number = Union[int, float]
Param = Union[Number, torch.Tensor]


@dataclass
class SamplingTensors:
    """Per-row sampling parameters, all on the logits' device.

    temperature: [B] float32, 0 = greedy row.
    top_k: [B] int32, 0 = off (values <= 0 or >= V are mapped to 0).
    top_p: [B] float32 in (0, 1], 1 = off.
    min_p: [B] float32 in [0, 1], 0 = off.
    repetition_penalty: [B] float32 > 0, 1 = off.
    seen_tokens: [B, L] int64 ids, -1 = padding, or None.
    The ``has_*`` flags let kernels skip a whole stage; they are True when unknown.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    seen_tokens: Optional[torch.Tensor]
    has_top_k: bool = True
    has_top_p: bool = True
    has_min_p: bool = True
    has_penalty: bool = True
    all_greedy: bool = False


def constant(value: Number, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[batch]`` tensor of ``value``, cached: backends only read their parameter tensors, so
    one copy serves every call with the same value, batch size and device (no allocation, and
    on CUDA no fill kernel, per step). Callers must never write to it. Not cached while a CUDA
    graph is being captured (its fill would only run when the graph replays)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((batch,), value, dtype=dtype, device=device)
    return _constant(value, batch, dtype, device)


@functools.lru_cache(maxsize=512)
def _constant(value: Number, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), value, dtype=dtype, device=device)


def top_k_off(k: int, vocab: int) -> int:
    """top_k as kernels take it: 0 when it filters nothing (<= 0 or >= vocab_size)."""
    return 0 if k <= 0 or k >= vocab else k


def _checked(name: str, value: Param, batch: int,
             label: Optional[str] = None) -> Union[Number, torch.Tensor]:
    """``value`` checked against the rule table: a number for all rows, or a ``[B]`` tensor.
    ``label``: the argument's name in messages (default ``name``)."""
    label = label or name
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.item()
        elif value.shape != (batch,):
            raise ValueError(f"{label} must be a number or a [{batch}] tensor, got shape "
                             f"{tuple(value.shape)}")
        else:
            _rules.check_rows(name, value, label=label)
            return value
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{label} must be a number or a tensor, got {type(value).__name__}")
    return _rules.check(name, value, label=label, where=" (all rows)")


def per_row_rule(name: str, value: Param, batch: int, device: torch.device,
                 label: Optional[str] = None) -> torch.Tensor:
    """A parameter of ``_rules.RULES[name]`` given as a number or a ``[B]`` tensor -> [B]
    float32 on ``device``, checked (``label``: its name in messages)."""
    return _rows(_checked(name, value, batch, label), batch, device)


def _rows(value: Union[Number, torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return constant(value, batch, torch.float32, device)


def _per_row(name: str, value: Param, batch: int,
             device: torch.device) -> tuple[torch.Tensor, Optional[float]]:
    """``([B] float32, the scalar when one value serves every row, else None)``."""
    value = _checked(name, value, batch)
    return _rows(value, batch, device), None if isinstance(value, torch.Tensor) else value


def _top_k(top_k: Param, batch: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``([B] int32 with 0 = off, whether any row may filter)``: values <= 0 or >= V are off."""
    k = _checked("top_k", top_k, batch)
    if isinstance(k, torch.Tensor):
        k = k.to(device)
        # Decided before the cast, so that a float or int64 beyond int32 cannot wrap around.
        return torch.where((k <= 0) | (k >= vocab), 0, k).to(torch.int32), True
    k = top_k_off(k, vocab)
    return constant(k, batch, torch.int32, device), k != 0


def normalize(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = 0,
              top_p: Param = 1.0, min_p: Param = 0.0, repetition_penalty: Param = 1.0,
              seen_tokens: Optional[torch.Tensor] = None) -> SamplingTensors:
    """Validate the sampling parameters for ``logits`` [B, V] and return them per row."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_seqs, vocab_size], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    batch, vocab = logits.shape
    dev = logits.device
    temp, t_s = _per_row("temperature", temperature, batch, dev)
    k, has_top_k = _top_k(top_k, batch, vocab, dev)
    p, p_s = _per_row("top_p", top_p, batch, dev)
    mp, mp_s = _per_row("min_p", min_p, batch, dev)
    rp, rp_s = _per_row("repetition_penalty", repetition_penalty, batch, dev)
    if seen_tokens is not None:
        if seen_tokens.dim() != 2 or seen_tokens.shape[0] != batch:
            raise ValueError(f"seen_tokens must be [{batch}, L], got shape "
                             f"{tuple(seen_tokens.shape)}")
        if seen_tokens.is_floating_point():
            raise TypeError(f"seen_tokens must hold integer ids, got {seen_tokens.dtype}")
        seen_tokens = seen_tokens.to(device=dev, dtype=torch.int64).contiguous()
        if seen_tokens.numel():
            bad = seen_tokens >= vocab
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(f"seen_tokens must be ids in [0, {vocab}) or -1 (padding); "
                                 f"row {row} has {int(seen_tokens[row].max())}")
    return SamplingTensors(
        temperature=temp, top_k=k, top_p=p, min_p=mp, repetition_penalty=rp,
        seen_tokens=seen_tokens,
        has_top_k=has_top_k,
        has_top_p=p_s != 1.0,
        has_min_p=mp_s != 0.0,
        has_penalty=seen_tokens is not None and seen_tokens.numel() > 0 and rp_s != 1.0,
        all_greedy=t_s == 0.0,
    )


# The per-row parameters of SamplingTensors: (name, dtype, the value that disables its stage;
# temperature 0 is greedy).
_ROWS = (("temperature", torch.float32, 0.0), ("top_k", torch.int32, 0),
         ("top_p", torch.float32, 1.0), ("min_p", torch.float32, 0.0),
         ("repetition_penalty", torch.float32, 1.0))
Rows = Union[Number, Sequence[Number]]


def from_host(batch: int, vocab: int, device: torch.device, *, temperature: Rows,
              top_k: Rows, top_p: Rows, min_p: Rows, repetition_penalty: Rows,
              seen_tokens: Optional[torch.Tensor] = None,
              upload: Optional[Callable[[str, list, torch.dtype], torch.Tensor]] = None
              ) -> SamplingTensors:
    """SamplingTensors from host values already checked against :mod:`fastdecode.ops._rules`.

    Each parameter is a number (every row) or a sequence of ``batch`` numbers; a sequence whose
    entries all agree counts as a number. Numbers become cached constants and set the stage
    flags exactly; sequences become ``[B]`` tensors through ``upload(name, values, dtype)``
    (default: ``torch.tensor(...).to(device, non_blocking=True)``), e.g. a view of a step's
    staging buffer. top_k values are mapped with :func:`top_k_off`. seen_tokens: [B, L] int64
    ids < vocab_size or -1, on ``device``. Nothing is read back from the device.
    """
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty)
    tensors, active = {}, {}
    for name, dtype, off in _ROWS:
        value = values[name]
        if not isinstance(value, numbers.Number):
            value = list(value)
            if name == "top_k":
                value = [top_k_off(int(k), vocab) for k in value]
            if all(v == value[0] for v in value):
                value = value[0]
        elif name == "top_k":
            value = top_k_off(int(value), vocab)
        if isinstance(value, numbers.Number):
            tensors[name] = constant(value, batch, dtype, device)
            active[name] = value != off
        else:
            tensors[name] = (upload(name, value, dtype) if upload is not None else
                             torch.tensor(value, dtype=dtype).to(device, non_blocking=True))
            active[name] = any(v != off for v in value)
    has_penalty = (active["repetition_penalty"] and seen_tokens is not None
                   and seen_tokens.numel() > 0)
    return SamplingTensors(
        seen_tokens=seen_tokens if has_penalty else None, has_top_k=active["top_k"],
        has_top_p=active["top_p"], has_min_p=active["min_p"], has_penalty=has_penalty,
        all_greedy=not active["temperature"], **tensors)


def seeds_and_offsets(batch: int, device: torch.device, seeds: Optional[torch.Tensor],
                      offsets: Optional[torch.Tensor],
                      generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(seeds [B] int64 >= 0, offsets [B] int64)`` for the counter-based RNG.

    Rows with ``seed < 0`` (or all rows when ``seeds`` is None) get a fresh random seed drawn from
    ``generator`` (torch's global RNG when None) and offset 0, so every backend draws through the
    same counter-based generator keyed by (seed, offset).
    """
    gen_device = generator.device if generator is not None else device
    fresh = torch.randint(0, 2**62, (batch,), generator=generator, device=gen_device,
                          dtype=torch.int64).to(device)
    if seeds is None:
        return fresh, torch.zeros(batch, dtype=torch.int64, device=device)
    for name, t in (("seeds", seeds), ("offsets", offsets)):
        if t is not None and (t.shape != (batch,) or t.is_floating_point()):
            raise ValueError(f"{name} must be a [{batch}] integer tensor, got "
                             f"{t.dtype} {tuple(t.shape)}")
    seeds = seeds.to(device=device, dtype=torch.int64)
    offsets = (torch.zeros(batch, dtype=torch.int64, device=device) if offsets is None
               else offsets.to(device=device, dtype=torch.int64))
    seeded = seeds >= 0
    return torch.where(seeded, seeds, fresh), torch.where(seeded, offsets, 0)
