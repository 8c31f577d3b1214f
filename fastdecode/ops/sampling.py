"""Public sampling ops: ``sample``, ``process_logits``, ``apply_repetition_penalty``.

Order and semantics are Hugging Face's: repetition penalty -> temperature -> top-k -> top-p ->
min-p -> draw. Parameters are Python numbers (all rows) or ``[B]`` tensors (per row). Every
tensor argument of a call is on the logits' device (0-d tensors count as numbers), else
ValueError.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.ops import _backends, _checks
from fastdecode.ops._params import Param, normalize, seeds_and_offsets


def _logits(logits: torch.Tensor, **tensors) -> torch.Tensor:
    """logits as a backend takes them: [B, V] (V >= 1), float32 / float16 / bfloat16, on a CPU or
    CUDA device with every tensor argument of the call (``tensors``; 0-d tensors count as
    numbers). Other float dtypes (float64) are converted to float32, the precision every backend
    processes in."""
    _checks.check_device(logits.device, **{name: t for name, t in tensors.items()
                                           if isinstance(t, torch.Tensor) and t.dim()})
    if logits.dim() == 2 and logits.shape[1] == 0:
        raise ValueError("logits must have vocab_size >= 1, got shape [B, 0]")
    if logits.is_floating_point() and logits.dtype not in _checks.FLOAT_DTYPES:
        return logits.float()
    return logits


def sample(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = 0,
           top_p: Param = 1.0, min_p: Param = 0.0, repetition_penalty: Param = 1.0,
           seen_tokens: Optional[torch.Tensor] = None, seeds: Optional[torch.Tensor] = None,
           offsets: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
           backend: str = "auto") -> torch.Tensor:
    """Draw one token per row from the processed distribution.

    logits: [num_seqs, vocab_size], any float dtype (float64 is converted to float32 first),
    read only, processed in float32.
    temperature (>= 0, 0 = greedy), top_k (<= 0 or >= V = off), top_p in (0, 1], min_p in [0, 1],
    repetition_penalty (> 0): numbers or [num_seqs] tensors.
    seen_tokens: [num_seqs, L] integer ids, -1 = padding; each distinct id penalised once.
    seeds, offsets: [num_seqs] int64; a row with seed >= 0 draws a pure function of (its logits,
    its parameters, seed, offset). Other rows draw from ``generator`` (global RNG when None).

    Returns [num_seqs] int64 token ids; -1 for a row with NaN logits or no finite logit left.
    """
    logits = _logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, seen_tokens=seen_tokens, seeds=seeds,
                     offsets=offsets)
    params = normalize(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repetition_penalty=repetition_penalty, seen_tokens=seen_tokens)
    seeds, offsets = seeds_and_offsets(logits.shape[0], logits.device, seeds, offsets, generator)
    impl = _backends.resolve(backend, "sample", logits.device)
    return impl.sample(logits, params, seeds, offsets)


def process_logits(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = 0,
                   top_p: Param = 1.0, min_p: Param = 0.0, repetition_penalty: Param = 1.0,
                   seen_tokens: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> torch.Tensor:
    """The processed scores HF's processors return, without drawing.

    logits: [num_seqs, vocab_size], any float dtype. Returns [num_seqs, vocab_size] float32: penalised, divided
    by the temperature, -inf where top-k / top-p / min-p filtered. Greedy rows (temperature 0)
    get only the repetition penalty.
    """
    logits = _logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, seen_tokens=seen_tokens)
    params = normalize(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       repetition_penalty=repetition_penalty, seen_tokens=seen_tokens)
    impl = _backends.resolve(backend, "process_logits", logits.device)
    return impl.process_logits(logits, params)


def apply_repetition_penalty(logits: torch.Tensor, seen_tokens: torch.Tensor,
                             penalty: Param, *, backend: str = "auto") -> torch.Tensor:
    """HF's repetition penalty alone: [num_seqs, vocab_size] float32 (a new tensor).

    seen_tokens: [num_seqs, L] integer ids, -1 = padding. Each distinct id is penalised once:
    a logit > 0 is divided by ``penalty``, any other multiplied by it.
    """
    logits = _logits(logits, seen_tokens=seen_tokens, penalty=penalty)
    params = normalize(logits, repetition_penalty=penalty, seen_tokens=seen_tokens)
    impl = _backends.resolve(backend, "apply_repetition_penalty", logits.device)
    return impl.apply_repetition_penalty(logits, params.seen_tokens, params.repetition_penalty)
