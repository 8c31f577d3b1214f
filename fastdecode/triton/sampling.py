"""Fused sampling without a vocabulary sort: repetition penalty, temperature, top-k, top-p,
min-p and the seeded draw, each row split over several programs (kernels:
:mod:`.sampling_kernels`).

Top-k and top-p become thresholds found by a radix search over the float32 values'
order-preserving integer keys: each level counts (top-k) or sums the probability mass (top-p)
above 16 pivots at once and fixes 4 bits of the threshold, so 8 levels give the exact k-th largest
value (ties kept) or the exact HF top-p cut, whatever the logits. Min-p is a single comparison in
logit space. The draw uses the Philox4x32-10 uniform of the row's (seed, offset) and takes the
first token in vocabulary order whose running sum of exp(x - max) exceeds u times the total, the
rule every backend shares (:mod:`fastdecode.ops.torch_backend`).

Launches (no host synchronisation): [penalty] -> stats -> 8 top-k levels (if any row may use
top-k) -> 8 top-p levels (idem) -> final pass -> [draw], each over (row, split) programs except
the draw (one program per row, scanning one split).

Shapes: logits [num_seqs, vocab_size]; per-row parameters [num_seqs]; seen_tokens
[num_seqs, L] int64 (-1 = padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from fastdecode.ops._params import SamplingTensors
from fastdecode.triton import sampling_kernels as k

# Logit dtypes read directly; others (float64) are converted to float32 first.
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Vocabulary chunk per loop step of a program.
BLOCK = 1024
# Chunk of a radix level: its [RADIX_BLOCK, 16] accumulator of the mass / count above each pivot
# stays in registers (32 floats per thread at 8 warps).
RADIX_BLOCK = 512
NUM_WARPS = 8
# Programs to aim for per launch: about 4 per SM of a 132-SM H100, so small batches still fill
# the GPU and each program walks as few chunks as the batch allows.
TARGET_PROGRAMS = 512
# Splits per row at most (the width of the kernels' per-split reductions).
MAX_SPLITS = 128


@dataclass(frozen=True)
class SamplingConfig:
    """One compiled variant of the sampling kernels (what the compile test enumerates)."""

    dtype: torch.dtype  # of the kernels' input: float32 penalised scores, or the raw logits
    write_scores: bool  # process_logits (True) or sample (False)
    block: int = BLOCK
    radix_block: int = RADIX_BLOCK
    num_warps: int = NUM_WARPS
    max_splits: int = MAX_SPLITS


def sampling_configs() -> list[SamplingConfig]:
    return [SamplingConfig(dtype, write) for dtype in LOGIT_DTYPES for write in (False, True)]


def split_plan(batch: int, vocab: int) -> tuple[int, int]:
    """(num_splits, chunks): each row's vocabulary as num_splits ranges of chunks x BLOCK
    tokens, as many splits as TARGET_PROGRAMS asks for (at most MAX_SPLITS, one chunk each)."""
    total = max(1, triton.cdiv(vocab, BLOCK))
    want = min(total, MAX_SPLITS, max(1, triton.cdiv(TARGET_PROGRAMS, max(batch, 1))))
    chunks = triton.cdiv(total, want)
    return triton.cdiv(total, chunks), chunks


@dataclass
class Workspace:
    """Per-call scratch of the split sampler (S = num_splits, steps 0..16):
    stat_max / stat_arg / stat_nan [B, S]: per split max, its first index, NaN flag;
    lo / floor [17, B] int32: the radix state each step entered with;
    part [17, B, S, 16] float32: weight above each pivot; total [17, B, S]: kept weight;
    last [B, S] int32: each split's last kept token."""

    stat_max: torch.Tensor
    stat_arg: torch.Tensor
    stat_nan: torch.Tensor
    lo: torch.Tensor
    floor: torch.Tensor
    part: torch.Tensor
    total: torch.Tensor
    last: torch.Tensor

    @classmethod
    def new(cls, batch: int, num_splits: int, device: torch.device) -> "Workspace":
        steps, f32, i32 = k.FINAL_STEP + 1, torch.float32, torch.int32

        def empty(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=device)

        return cls(empty((batch, num_splits), f32), empty((batch, num_splits), i32),
                   empty((batch, num_splits), i32), empty((steps, batch), i32),
                   empty((steps, batch), i32), empty((steps, batch, num_splits, 16), f32),
                   empty((steps, batch, num_splits), f32), empty((batch, num_splits), i32))


# ------------------------------------------------------------------------------------ launchers
def _rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits as the kernels read them: a compiled dtype, unit stride along the vocabulary."""
    if logits.dtype not in LOGIT_DTYPES:
        return logits.float()
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def philox_uniform(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The uniform each seeded row draws: seeds, offsets [n] int64 -> [n] float32 in [0, 1)."""
    out = torch.empty(seeds.shape, dtype=torch.float32, device=seeds.device)
    if seeds.numel():
        grid = (triton.cdiv(seeds.numel(), BLOCK),)
        k._philox_uniform_kernel[grid](out, seeds.contiguous(), offsets.contiguous(),
                                       seeds.numel(), BLOCK_SIZE=BLOCK)
    return out


def apply_repetition_penalty(logits: torch.Tensor, seen_tokens, penalty) -> torch.Tensor:
    """logits [B, V] any float dtype -> [B, V] float32 penalised copy."""
    logits = _rows(logits)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    batch, vocab = logits.shape
    if batch == 0:
        return out
    if seen_tokens is None or seen_tokens.numel() == 0:
        seen_tokens = torch.full((batch, 1), -1, dtype=torch.int64, device=logits.device)
    num_splits, chunks = split_plan(batch, vocab)
    k._repetition_penalty_kernel[(batch, num_splits)](
        out, logits, seen_tokens, penalty,
        logits.stride(0), out.stride(0), seen_tokens.stride(0),
        vocab, seen_tokens.shape[1], chunks,
        BLOCK=BLOCK, num_warps=4,
    )
    return out


def _scores(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The kernel input: penalised float32 scores, or the logits themselves without penalty."""
    if params.has_penalty:
        return apply_repetition_penalty(logits, params.seen_tokens, params.repetition_penalty)
    return _rows(logits)


def _launch(out: torch.Tensor, scores: torch.Tensor, params: SamplingTensors,
            seeds: Optional[torch.Tensor], offsets: Optional[torch.Tensor]) -> None:
    batch, vocab = scores.shape
    if batch == 0:
        return
    cfg = SamplingConfig(scores.dtype, write_scores=seeds is None)
    num_splits, chunks = split_plan(batch, vocab)
    ws = Workspace.new(batch, num_splits, scores.device)
    grid = (batch, num_splits)
    stats = (ws.stat_max, ws.stat_arg, ws.stat_nan)
    shape = (vocab, batch, num_splits, chunks)
    sizes = dict(BLOCK=cfg.block, SPLITS=cfg.max_splits, num_warps=cfg.num_warps)
    k._stats_kernel[grid](*stats, scores, params.temperature, scores.stride(0), vocab,
                          num_splits, chunks, BLOCK=cfg.block, num_warps=cfg.num_warps)
    steps = [*(range(8) if params.has_top_k else ()), *(range(8, 16) if params.has_top_p else ())]
    prev = -1
    for step in steps:
        k._radix_kernel[grid](ws.lo, ws.floor, ws.part, ws.total, *stats, scores,
                              params.temperature, params.top_k, params.top_p, scores.stride(0),
                              *shape, step, prev, RADIX=cfg.radix_block, **sizes)
        prev = step
    final = k.FINAL_STEP
    k._final_kernel[grid](out, ws.last, ws.lo, ws.floor, ws.part, ws.total, *stats, scores,
                          params.temperature, params.top_k, params.top_p, params.min_p,
                          scores.stride(0), out.stride(0), *shape, final, prev,
                          WRITE_SCORES=cfg.write_scores, **sizes)
    if not cfg.write_scores:
        k._draw_kernel[(batch,)](out, ws.last, ws.floor, ws.total, *stats, scores,
                                 params.temperature, params.min_p, seeds, offsets,
                                 scores.stride(0), *shape, final, **sizes)


def process_logits(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """logits [B, V] -> [B, V] float32 processed scores (HF's ``scores``)."""
    scores = _scores(logits, params)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _launch(out, scores, params, None, None)  # no draw: no seeds
    return out


def sample(logits: torch.Tensor, params: SamplingTensors, seeds: torch.Tensor,
           offsets: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64 token ids; -1 for NaN rows or rows with nothing finite left."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _launch(out, _scores(logits, params), params, seeds, offsets)
    return out
