"""Triton kernels of the split sampler (launch order and workspace in :mod:`.sampling`).

Every row's vocabulary is cut into ``num_splits`` ranges of ``chunks`` x ``BLOCK`` tokens, one
program per (row, split), so a row keeps many SMs busy and each program walks only its range.
Steps that need the whole row (the max, each radix level's choice) are separate launches: a
launch writes per-split partials into the workspace and every program of the next launch
re-reduces them, in the same order, so all splits of a row agree without atomics or a grid-wide
barrier. Radix step ``s`` (0-7: top-k levels, 8-15: top-p levels) counts (top-k) or sums the
probability mass (top-p) above 16 pivots in the current key sub-range, accumulated per element
over the range and reduced across warps once per program; step 16 is the final pass (draw sums
or written scores). ``prev`` is the previous launched step (-1: none), so skipped stages need no
launch. Shapes: logits [B, V]; workspace tensors as in :class:`.sampling.Workspace`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Top-p drops a token when the mass strictly above it reaches top_p of the total; an exact tie
# (HF drops it) is decided up to this fraction of the total, whatever the float rounding of the
# sums. The same rule as the CPU and CUDA kernels.
TOP_P_TOLERANCE = tl.constexpr(1e-6)
KEY_MIN = tl.constexpr(-2147483648)
FINAL_STEP = 16  # steps 0-15 are radix levels; the final pass is step 16
SHAPE_ARGS = ["num_splits", "chunks", "step", "prev"]  # vary with the batch: no re-specialising


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
def _row(row, temperature_ptr, stat_max_ptr, stat_arg_ptr, stat_nan_ptr, num_splits, vocab,
         SPLITS: tl.constexpr):
    """The row's temperature divisor, max, first argmax, NaN flag and whether it is filtered
    (sampled with a finite max), from the per-split statistics."""
    temperature = tl.load(temperature_ptr + row)
    t_div = tl.where(temperature == 0, 1.0, temperature)  # greedy rows: the logits as they are
    s = tl.arange(0, SPLITS)
    ok = s < num_splits
    base = row * num_splits
    m = tl.load(stat_max_ptr + base + s, mask=ok, other=float("-inf"))
    x_max = tl.max(m, 0)
    arg = tl.min(tl.where(ok & (m == x_max), tl.load(stat_arg_ptr + base + s, mask=ok), vocab), 0)
    nan = tl.max(tl.load(stat_nan_ptr + base + s, mask=ok, other=0), 0)
    filtered = (temperature > 0) & (nan == 0) & (x_max > float("-inf")) & (x_max < float("inf"))
    return temperature, t_div, x_max, arg, nan, filtered


@triton.jit
def _stage_on(step, filtered, top_k, top_p):
    """Whether radix step ``step`` searches this row: top-k levels need top_k > 0, top-p levels
    top_p < 1; the final step always runs."""
    on = tl.where(step < 8, top_k > 0, top_p < 1.0) | (step >= 16)
    return filtered & on


@triton.jit
def _enter(row, step, prev, filtered, top_k, top_p, lo_ptr, floor_ptr, part_ptr, total_ptr,
           batch, num_splits, SPLITS: tl.constexpr):
    """(lo, floor) entering ``step``: the radix search's current lower bound and the key floor
    fixed by the finished stages (top-k's threshold during top-p, both in the final step)."""
    lo = tl.full((), KEY_MIN, tl.int32)
    floor = tl.full((), KEY_MIN, tl.int32)
    if prev >= 0:
        lo = tl.load(lo_ptr + prev * batch + row)
        floor = tl.load(floor_ptr + prev * batch + row)
        if _stage_on(prev, filtered, top_k, top_p):
            s = tl.arange(0, SPLITS)
            d = tl.arange(0, 16)
            ok = s < num_splits
            base = (prev * batch + row) * num_splits
            part = tl.load(part_ptr + (base + s)[:, None] * 16 + d[None, :], mask=ok[:, None],
                           other=0.0)
            f = tl.sum(part, 0)  # f[d]: weight above pivot d, the same sum in every program
            if prev < 8:
                target = top_k.to(tl.float32)
            else:
                # HF: keep x iff the mass strictly above x is < top_p (smallest set reaching
                # it). The target stays positive: a tiny top_p keeps the max's group.
                mass = tl.sum(tl.load(total_ptr + base + s, mask=ok, other=0.0), 0)
                target = tl.maximum((top_p - TOP_P_TOLERANCE) * mass, 1e-30)
            # f is non-increasing over the pivots: the number still >= target is the digit.
            digit = tl.minimum(tl.sum((f >= target).to(tl.int32), 0), 15)
            lo = (lo.to(tl.int64) + (digit.to(tl.int64) << (28 - 4 * (prev % 8)).to(tl.int64))).to(tl.int32)
            if prev % 8 == 7:  # the stage's search is complete: its threshold is the floor
                floor = lo
        if prev % 8 == 7:
            lo = tl.full((), KEY_MIN, tl.int32)
    return lo, floor


@triton.jit
def _begin_step(step, prev, lo_ptr, floor_ptr, part_ptr, total_ptr, stat_max_ptr,
                stat_arg_ptr, stat_nan_ptr, temperature_ptr, top_k_ptr, top_p_ptr, vocab, batch,
                num_splits, SPLITS: tl.constexpr):
    """What a (row, split) program of ``step`` starts from: its row and split, the row's
    temperature divisor, max, filtered flag, top_k, top_p and the (lo, floor) entering the step,
    which split 0 records for the next launch."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    _, t_div, x_max, _, _, filtered = _row(row, temperature_ptr, stat_max_ptr, stat_arg_ptr,
                                           stat_nan_ptr, num_splits, vocab, SPLITS)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    lo, floor = _enter(row, step, prev, filtered, top_k, top_p, lo_ptr, floor_ptr, part_ptr,
                       total_ptr, batch, num_splits, SPLITS)
    if split == 0:
        tl.store(lo_ptr + step * batch + row, lo)
        tl.store(floor_ptr + step * batch + row, floor)
    return row, split, t_div, x_max, filtered, top_k, top_p, lo, floor


@triton.jit(do_not_specialize=["num_splits", "chunks"])
def _stats_kernel(stat_max_ptr, stat_arg_ptr, stat_nan_ptr, logits_ptr, temperature_ptr,
                  stride_lb, vocab, num_splits, chunks, BLOCK: tl.constexpr):
    """Per (row, split): max of x (NaN-free), its first index, NaN flag."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lb
    temperature = tl.load(temperature_ptr + row)
    t_div = tl.where(temperature == 0, 1.0, temperature)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.full([BLOCK], 0, tl.int32)
    nans = tl.zeros([BLOCK], tl.int32)
    begin = split * chunks * BLOCK
    for c in range(0, chunks):
        offs = begin + c * BLOCK + tl.arange(0, BLOCK)
        x = _load_scaled(row_ptr, offs, vocab, t_div)
        nans = tl.maximum(nans, (x != x).to(tl.int32))
        better = x > best  # strict (and False for NaN): a position keeps its first maximum
        best_at = tl.where(better, offs, best_at)
        best = tl.where(better, x, best)
    m = tl.max(best, 0)
    at = row * num_splits + split
    tl.store(stat_max_ptr + at, m)
    tl.store(stat_arg_ptr + at, tl.min(tl.where(best == m, best_at, vocab), 0))
    tl.store(stat_nan_ptr + at, tl.max(nans, 0))


@triton.jit(do_not_specialize=SHAPE_ARGS)
def _radix_kernel(lo_ptr, floor_ptr, part_ptr, total_ptr, stat_max_ptr, stat_arg_ptr,
                  stat_nan_ptr, logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr,
                  stride_lb, vocab, batch, num_splits, chunks, step, prev,
                  BLOCK: tl.constexpr, RADIX: tl.constexpr, SPLITS: tl.constexpr):
    """One radix level of a (row, split): part[step, row, split, d] = weight (1 or
    exp(x - max)) of the range's tokens with key >= floor and key > pivot d, total[...] = the
    weight of those with key >= floor."""
    row, split, t_div, x_max, filtered, top_k, top_p, lo, floor = _begin_step(
        step, prev, lo_ptr, floor_ptr, part_ptr, total_ptr, stat_max_ptr,
        stat_arg_ptr, stat_nan_ptr, temperature_ptr, top_k_ptr, top_p_ptr, vocab, batch,
        num_splits, SPLITS)
    if _stage_on(step, filtered, top_k, top_p):
        shift = (28 - 4 * (step % 8)).to(tl.int64)
        # Pivots in int64 (the top one of the full range is 2**31 - 1 only after the - 1).
        pivots = (lo.to(tl.int64) + ((tl.arange(0, 16).to(tl.int64) + 1) << shift) - 1)
        pivots = pivots.to(tl.int32)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_lb
        acc = tl.zeros([RADIX, 16], tl.float32)  # per element position: weight above each pivot
        kept = tl.zeros([RADIX], tl.float32)
        begin = split * chunks * BLOCK
        for c in range(0, chunks * (BLOCK // RADIX)):
            offs = begin + c * RADIX + tl.arange(0, RADIX)
            x = _load_scaled(row_ptr, offs, vocab, t_div)
            key = _key(x)
            if step < 8:
                w = tl.full([RADIX], 1.0, tl.float32)
            else:
                w = tl.exp(x - x_max)
            w = tl.where((key >= floor) & (offs < vocab), w, 0.0)
            kept += w
            acc += tl.where(key[:, None] > pivots[None, :], w[:, None], 0.0)
        at = (step * batch + row) * num_splits + split
        tl.store(part_ptr + at * 16 + tl.arange(0, 16), tl.sum(acc, 0))  # one reduction a level
        tl.store(total_ptr + at, tl.sum(kept, 0))


@triton.jit
def _kept_weight(x, x_max, floor, min_x):
    """exp(x - max) of a token the filters keep, else 0."""
    keep = (_key(x) >= floor) & (x >= min_x)
    return tl.where(keep, tl.exp(x - x_max), 0.0)


@triton.jit
def _min_x(min_p_ptr, row, x_max, filtered):
    """min-p in logit space: p < min_p * p_max  <=>  x < x_max + log(min_p) (min_p 0: -inf)."""
    min_p = tl.load(min_p_ptr + row)
    return tl.where(filtered & (min_p > 0), x_max + tl.log(tl.where(min_p > 0, min_p, 1.0)),
                    float("-inf"))


@triton.jit(do_not_specialize=SHAPE_ARGS)
def _final_kernel(out_ptr, last_ptr, lo_ptr, floor_ptr, part_ptr, total_ptr, stat_max_ptr,
                  stat_arg_ptr, stat_nan_ptr, logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr,
                  min_p_ptr, stride_lb, stride_ob, vocab, batch, num_splits, chunks, step, prev,
                  WRITE_SCORES: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    """WRITE_SCORES: out [B, V] float32 processed scores of the range. Else the draw's
    partials: total[step, row, split] = the range's kept weight, last[row, split] = its last
    kept token (-1: none). The final floor recorded by split 0 is :func:`_draw_kernel`'s."""
    row, split, t_div, x_max, filtered, _, _, _, floor = _begin_step(
        step, prev, lo_ptr, floor_ptr, part_ptr, total_ptr, stat_max_ptr,
        stat_arg_ptr, stat_nan_ptr, temperature_ptr, top_k_ptr, top_p_ptr, vocab, batch,
        num_splits, SPLITS)
    min_x = _min_x(min_p_ptr, row, x_max, filtered)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lb
    begin = split * chunks * BLOCK
    if WRITE_SCORES:
        out_row = out_ptr + row.to(tl.int64) * stride_ob
        for c in range(0, chunks):
            offs = begin + c * BLOCK + tl.arange(0, BLOCK)
            x = _load_scaled(row_ptr, offs, vocab, t_div)
            keep = (_key(x) >= floor) & (x >= min_x)
            tl.store(out_row + offs, tl.where(keep | (filtered == 0), x, float("-inf")),
                     mask=offs < vocab)
    elif filtered:
        kept = tl.zeros([BLOCK], tl.float32)
        last = tl.full([BLOCK], -1, tl.int32)
        for c in range(0, chunks):
            offs = begin + c * BLOCK + tl.arange(0, BLOCK)
            w = _kept_weight(_load_scaled(row_ptr, offs, vocab, t_div), x_max, floor, min_x)
            kept += w
            last = tl.maximum(last, tl.where(w > 0, offs, -1))
        at = row * num_splits + split
        tl.store(total_ptr + (step * batch) * num_splits + at, tl.sum(kept, 0))
        tl.store(last_ptr + at, tl.max(last, 0))


@triton.jit(do_not_specialize=SHAPE_ARGS)
def _draw_kernel(out_ptr, last_ptr, floor_ptr, total_ptr, stat_max_ptr, stat_arg_ptr,
                 stat_nan_ptr, logits_ptr, temperature_ptr, min_p_ptr, seeds_ptr, offsets_ptr,
                 stride_lb, vocab, batch, num_splits, chunks, step,
                 BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    """out [B] int64: the first token in vocabulary order whose running sum of kept weights
    exceeds u times their total; the argmax for greedy rows; -1 for NaN rows or rows with
    nothing finite. One program per row: it picks the split from the per-split sums, then scans
    that split only."""
    row = tl.program_id(0)
    temperature, t_div, x_max, arg, nan, filtered = _row(
        row, temperature_ptr, stat_max_ptr, stat_arg_ptr, stat_nan_ptr, num_splits, vocab, SPLITS)
    token = arg
    if filtered:  # only these rows draw: the others are greedy or yield -1
        u = _philox_uniform(tl.load(seeds_ptr + row), tl.load(offsets_ptr + row))
        s = tl.arange(0, SPLITS)
        ok = s < num_splits
        sums = tl.load(total_ptr + (step * batch + row) * num_splits + s, mask=ok, other=0.0)
        target = u * tl.sum(sums, 0)
        ends = tl.cumsum(sums, 0)
        # The first split whose running sum passes the target; rounding can put the target past
        # the end: then the last split with a kept token.
        hit = ok & (ends > target) & (sums > 0)
        split = tl.min(tl.where(hit, s, SPLITS), 0)
        split = tl.where(split == SPLITS, tl.max(tl.where(ok & (sums > 0), s, -1), 0), split)
        carry = tl.sum(tl.where(s < split, sums, 0.0), 0)
        floor = tl.load(floor_ptr + step * batch + row)
        min_x = _min_x(min_p_ptr, row, x_max, filtered)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_lb
        drawn = vocab
        begin = split * chunks * BLOCK
        for c in range(0, chunks):
            offs = begin + c * BLOCK + tl.arange(0, BLOCK)
            w = _kept_weight(_load_scaled(row_ptr, offs, vocab, t_div), x_max, floor, min_x)
            # w > 0: rounding between chunk sums and scans must never pick a filtered token.
            hit_at = (carry + tl.cumsum(w, 0) > target) & (w > 0)
            drawn = tl.minimum(drawn, tl.min(tl.where(hit_at, offs, vocab), 0))
            carry += tl.sum(w, 0)
        # Rounding can leave the split's scan short of the target: its last kept token.
        token = tl.where(drawn == vocab, tl.load(last_ptr + row * num_splits + split), drawn)
    greedy = temperature == 0
    bad = (nan != 0) | (x_max == float("-inf")) | ((greedy == 0) & (x_max == float("inf")))
    tl.store(out_ptr + row, tl.where(bad, -1, token).to(tl.int64))


@triton.jit(do_not_specialize=["stride_sb", "num_seen", "chunks"])
def _repetition_penalty_kernel(out_ptr, logits_ptr, seen_ptr, penalty_ptr,
                               stride_lb, stride_ob, stride_sb, vocab, num_seen, chunks,
                               BLOCK: tl.constexpr):
    """out = float32 copy of the (row, split)'s range of logits with each seen id in the range
    penalised (HF rule). Every write of a seen id stores the penalty applied to the ORIGINAL
    logit, so duplicate ids write the same value and are penalised once."""
    row = tl.program_id(0)
    begin = tl.program_id(1) * chunks * BLOCK
    end = tl.minimum(begin + chunks * BLOCK, vocab)
    in_row = logits_ptr + row.to(tl.int64) * stride_lb
    out_row = out_ptr + row.to(tl.int64) * stride_ob
    for c in range(0, chunks):
        offs = begin + c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(in_row + offs, mask=offs < end).to(tl.float32)
        tl.store(out_row + offs, x, mask=offs < end)
    tl.debug_barrier()  # the copy above must land before the penalised ids overwrite it
    penalty = tl.load(penalty_ptr + row)
    seen_row = seen_ptr + row.to(tl.int64) * stride_sb
    for start in range(0, num_seen, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ids = tl.load(seen_row + offs, mask=offs < num_seen, other=-1)
        ok = (ids >= begin) & (ids < end)  # -1 = padding; other splits' and invalid ids skipped
        x = tl.load(in_row + ids, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(x > 0, tl.math.div_rn(x, penalty), x * penalty)
        tl.store(out_row + ids, x, mask=ok)


@triton.jit
def _philox_uniform_kernel(out_ptr, seeds_ptr, offsets_ptr, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    seed = tl.load(seeds_ptr + offs, mask=mask, other=0)
    offset = tl.load(offsets_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, _philox_uniform(seed, offset), mask=mask)
