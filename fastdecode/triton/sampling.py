"""Fused sampling without a vocabulary sort: repetition penalty, temperature, top-k, top-p,
min-p and the seeded draw.

One program per row loops over the vocabulary in ``BLOCK`` chunks. Top-k and top-p become
thresholds found by a radix search over the float32 values' order-preserving integer keys: each
pass counts (top-k) or sums the probability mass (top-p) above 16 pivots at once and fixes 4 bits
of the threshold, so 8 passes give the exact k-th largest value (ties kept) or the exact HF top-p
cut, whatever the logits. Loops over the vocabulary accumulate element-wise (each thread keeps
its own partial sums / maxima) and reduce across the warps once, after the loop: a reduction per
chunk would cost a shared-memory round trip and a barrier per chunk of every pass. Min-p is a
single comparison in logit space. The draw uses the Philox4x32-10 uniform of the row's (seed,
offset) and takes the first token in vocabulary order whose running sum of exp(x - max) exceeds
u times the total, the rule every backend shares (:mod:`fastdecode.ops.torch_backend`).

Shapes: logits [num_seqs, vocab_size]; per-row parameters [num_seqs]; seen_tokens
[num_seqs, L] int64 (-1 = padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from fastdecode.ops._params import SamplingTensors

# Logit dtypes read directly; others (float64) are converted to float32 first.
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Top-p drops a token when the mass strictly above it reaches top_p of the total; an exact tie
# (HF drops it) is decided up to this fraction of the total, whatever the float rounding of the
# sums. The same rule as the CPU and CUDA kernels.
TOP_P_TOLERANCE = tl.constexpr(1e-6)
# Vocabulary chunk per loop step. Rows are independent programs, so one row per SM at most.
BLOCK = 1024
# Chunk of a radix pass: its [RADIX_BLOCK, 16] accumulator of the mass / count above each pivot
# stays in registers (32 floats per thread at 8 warps).
RADIX_BLOCK = 512
NUM_WARPS = 8


@dataclass(frozen=True)
class SamplingConfig:
    """One compiled variant of ``_sampling_kernel`` (what the compile test enumerates)."""

    dtype: torch.dtype  # of the kernel input: float32 penalised scores, or the raw logits
    write_scores: bool  # process_logits (True) or sample (False)
    block: int = BLOCK
    radix_block: int = RADIX_BLOCK
    num_warps: int = NUM_WARPS


def sampling_configs() -> list[SamplingConfig]:
    return [SamplingConfig(dtype, write) for dtype in LOGIT_DTYPES for write in (False, True)]


@triton.jit
def _philox_uniform(seed, offset):
    """Philox4x32-10 keyed by seed (int64), counter (offset low, offset high, 0, 0); returns
    (x0 >> 8) * 2**-24, float32 in [0, 1). Mirrors csrc/common/philox.h bit for bit."""
    k0 = seed.to(tl.uint32)  # int64 -> uint32 truncates: the low word
    k1 = (seed >> 32).to(tl.uint32)
    c0 = offset.to(tl.uint32)
    c1 = (offset >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _philox_uniform_kernel(out_ptr, seeds_ptr, offsets_ptr, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    seed = tl.load(seeds_ptr + offs, mask=mask, other=0)
    offset = tl.load(offsets_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, _philox_uniform(seed, offset), mask=mask)


@triton.jit
def _load_scaled(row_ptr, offs, vocab, temperature):
    """x = logits / temperature as float32 (IEEE division, as HF); -inf past the vocabulary.
    16-bit logits are upcast right after the load (also what the interpreter needs)."""
    x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    # + 0.0 maps -0.0 to +0.0, so equal values get equal keys.
    return tl.math.div_rn(x, temperature) + 0.0


@triton.jit
def _key(x):
    """Order-preserving float32 -> int32 map (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _threshold(row_ptr, vocab, temperature, x_max, floor_key, target,
               MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Smallest key K with f(K) < target, f(K) = sum over tokens with key > K (and key >=
    floor_key) of 1 (MASS False: top-k) or exp(x - x_max) (MASS True: top-p). f only decreases
    with K, so each pass evaluates it at the top of 16 sub-ranges and keeps the first sub-range
    whose top satisfies it: 4 bits per pass, always 8 passes (no data-dependent loop)."""
    lo = tl.full((), -2147483648, tl.int64)
    digits = tl.arange(0, 16).to(tl.int64)
    for level in range(8):
        shift = 28 - 4 * level
        pivots = lo + ((digits + 1) << shift) - 1
        acc = tl.zeros([BLOCK, 16], tl.float32)  # per element position: weight above each pivot
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = _load_scaled(row_ptr, offs, vocab, temperature)
            key = _key(x)
            if MASS:
                w = tl.exp(x - x_max)
            else:
                w = tl.full([BLOCK], 1.0, tl.float32)
            w = tl.where((key >= floor_key) & (offs < vocab), w, 0.0)
            above = key.to(tl.int64)[:, None] > pivots[None, :]
            acc += tl.where(above, w[:, None], 0.0)
        f = tl.sum(acc, 0)  # the level's one reduction across the warps
        # f is non-increasing over the pivots (nested sums, same reduction order): the number of
        # pivots still >= target is the digit.
        digit = tl.minimum(tl.sum((f >= target).to(tl.int32), 0), 15)
        lo += digit.to(tl.int64) << shift
    return lo.to(tl.int32)


@triton.jit
def _kept_weight(x, x_max, floor_key, min_x):
    """exp(x - max) of a token the filters keep, else 0."""
    keep = (_key(x) >= floor_key) & (x >= min_x)
    return tl.where(keep, tl.exp(x - x_max), 0.0)


@triton.jit
def _draw(row_ptr, vocab, temperature, x_max, floor_key, min_x, u, BLOCK: tl.constexpr):
    """The first token in vocabulary order whose running sum of kept weights exceeds u times
    their total (two passes)."""
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _load_scaled(row_ptr, offs, vocab, temperature)
        total += _kept_weight(x, x_max, floor_key, min_x)
    target = u * tl.sum(total, 0)
    carry = tl.zeros((), tl.float32)
    drawn = vocab
    last_kept = -1
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = _kept_weight(_load_scaled(row_ptr, offs, vocab, temperature), x_max, floor_key,
                         min_x)
        # w > 0: rounding between chunk sums and scans must never pick a filtered token.
        hit = (carry + tl.cumsum(w, 0) > target) & (w > 0)
        drawn = tl.minimum(drawn, tl.min(tl.where(hit, offs, vocab), 0))
        last_kept = tl.maximum(last_kept, tl.max(tl.where(w > 0, offs, -1), 0))
        carry += tl.sum(w, 0)
    # Rounding can put the target past the last kept token's running sum: take that token.
    return tl.where(drawn == vocab, last_kept, drawn)


@triton.jit
def _sampling_kernel(
    out_ptr, logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr,
    offsets_ptr,
    stride_lb, stride_ob,
    vocab,
    WRITE_SCORES: tl.constexpr, BLOCK: tl.constexpr, RADIX: tl.constexpr,
):
    """WRITE_SCORES: out [B, V] float32 processed scores (process_logits); else out [B] int64
    token ids (sample). logits: penalised float32 scores, or the raw logits without penalty."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lb
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0
    t_div = tl.where(greedy, 1.0, temperature)  # greedy rows see the penalised logits as they are

    # Pass 1: max (NaN-free), first argmax, NaN flag, per element position, then reduced once.
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.full([BLOCK], 0, tl.int32)
    nans = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _load_scaled(row_ptr, offs, vocab, t_div)
        nans = tl.maximum(nans, (x != x).to(tl.int32))
        better = x > best  # strict (and False for NaN): a position keeps its first maximum
        best_at = tl.where(better, offs, best_at)
        best = tl.where(better, x, best)
    x_max = tl.max(best, 0)
    arg = tl.min(tl.where(best == x_max, best_at, vocab), 0)  # the first index of the max
    nan = tl.max(nans, 0)

    # Filters only for sampled rows with a finite max (other rows are greedy or yield -1).
    filtered = (temperature > 0) & (nan == 0) & (x_max > float("-inf")) & (x_max < float("inf"))
    floor_key = tl.full((), -2147483648, tl.int32)  # keep every key
    if filtered:
        top_k = tl.load(top_k_ptr + row)
        if top_k > 0:
            floor_key = _threshold(row_ptr, vocab, t_div, x_max, floor_key,
                                   top_k.to(tl.float32), False, RADIX)
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1.0:
            kept_mass = tl.zeros([BLOCK], tl.float32)
            for start in range(0, vocab, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = _load_scaled(row_ptr, offs, vocab, t_div)
                kept_mass += tl.where(_key(x) >= floor_key, tl.exp(x - x_max), 0.0)
            # HF: keep x iff the mass strictly above x is < top_p (smallest set reaching it).
            # The target stays positive: a tiny top_p keeps the max's group.
            target = tl.maximum((top_p - TOP_P_TOLERANCE) * tl.sum(kept_mass, 0), 1e-30)
            floor_key = _threshold(row_ptr, vocab, t_div, x_max, floor_key, target, True, RADIX)
    # min-p in logit space: p < min_p * p_max  <=>  x < x_max + log(min_p) (min_p 0: -inf).
    min_p = tl.load(min_p_ptr + row)
    min_x = tl.where(filtered & (min_p > 0), x_max + tl.log(tl.where(min_p > 0, min_p, 1.0)),
                     float("-inf"))

    if WRITE_SCORES:
        out_row = out_ptr + row.to(tl.int64) * stride_ob
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = _load_scaled(row_ptr, offs, vocab, t_div)
            keep = (_key(x) >= floor_key) & (x >= min_x)
            tl.store(out_row + offs, tl.where(keep | (filtered == 0), x, float("-inf")),
                     mask=offs < vocab)
    else:
        token = arg
        if filtered:  # only these rows draw: the others are greedy or yield -1
            u = _philox_uniform(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
            token = _draw(row_ptr, vocab, t_div, x_max, floor_key, min_x, u, BLOCK)
        bad = (nan != 0) | (x_max == float("-inf")) | ((greedy == 0) & (x_max == float("inf")))
        tl.store(out_ptr + row, tl.where(bad, -1, token).to(tl.int64))


@triton.jit(do_not_specialize=["stride_sb", "num_seen"])
def _repetition_penalty_kernel(
    out_ptr, logits_ptr, seen_ptr, penalty_ptr,
    stride_lb, stride_ob, stride_sb,
    vocab, num_seen,
    BLOCK: tl.constexpr,
):
    """out = float32 copy of logits with each seen id penalised (HF rule). Every write of a seen
    id stores the penalty applied to the ORIGINAL logit, so duplicate ids write the same value
    and are penalised once."""
    row = tl.program_id(0)
    in_row = logits_ptr + row.to(tl.int64) * stride_lb
    out_row = out_ptr + row.to(tl.int64) * stride_ob
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(in_row + offs, mask=offs < vocab).to(tl.float32)
        tl.store(out_row + offs, x, mask=offs < vocab)
    tl.debug_barrier()  # the copy above must land before the penalised ids overwrite it
    penalty = tl.load(penalty_ptr + row)
    seen_row = seen_ptr + row.to(tl.int64) * stride_sb
    for start in range(0, num_seen, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(seen_row + offs, mask=offs < num_seen, other=-1)
        ok = (ids >= 0) & (ids < vocab)  # -1 = padding; out-of-vocabulary ids: guarded
        x = tl.load(in_row + ids, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(x > 0, tl.math.div_rn(x, penalty), x * penalty)
        tl.store(out_row + ids, x, mask=ok)


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
        _philox_uniform_kernel[grid](out, seeds.contiguous(), offsets.contiguous(), seeds.numel(),
                                     BLOCK_SIZE=BLOCK)
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
    _repetition_penalty_kernel[(batch,)](
        out, logits, seen_tokens, penalty,
        logits.stride(0), out.stride(0), seen_tokens.stride(0),
        vocab, seen_tokens.shape[1],
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
    _sampling_kernel[(batch,)](
        out, scores, params.temperature, params.top_k, params.top_p, params.min_p, seeds,
        offsets, scores.stride(0), out.stride(0), vocab,
        WRITE_SCORES=cfg.write_scores, BLOCK=cfg.block, RADIX=cfg.radix_block,
        num_warps=cfg.num_warps,
    )


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
