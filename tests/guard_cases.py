"""Poisoned inputs for the GPU kernels' device-side guards, shared by the Triton (interpreter) and
CUDA (emulator) tests.

On CUDA tensors the public ops do not copy index tensors to the host to check them, so the kernels
guard themselves: a bad sequence's output rows come out NaN and nothing outside the tensors is
read or written. These helpers call a backend directly (bypassing the public validation) with
tensors fenced by sentinel regions (on the device the backend runs on), and run each CPU call in
a forked child so that an out-of-bounds access that crashes fails the test instead of ending the
session (CUDA cannot fork: there an illegal access surfaces as a CUDA error).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import torch

from paged_cases import PagedCase, make_case

SENTINEL = 4321.0  # finite, so a read of the fence would show as a finite wrong value
FENCE = 3  # rows of sentinel before and after each fenced tensor


def fenced(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): ``data`` copied into the middle of a sentinel buffer along dim 0, so that
    an index one past either end lands in the fence. The view is contiguous."""
    shape = (data.shape[0] + 2 * FENCE, *data.shape[1:])
    buffer = torch.full(shape, SENTINEL, dtype=data.dtype, device=data.device)
    view = buffer[FENCE:FENCE + data.shape[0]]
    view.copy_(data)
    return buffer, view


def fence_intact(buffer: torch.Tensor) -> bool:
    return bool((buffer[:FENCE] == SENTINEL).all() and (buffer[-FENCE:] == SENTINEL).all())


def run_isolated(fn: Callable[[], None], device: torch.device,
                 timeout_s: float = 300.0) -> None:
    """Runs fn() in a forked child (CPU tensors); a crash (signal) or an exception there fails
    here. With CUDA tensors, runs it in this process."""
    if device.type == "cuda":
        fn()
        return
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child, args=(fn,))
    child.start()
    child.join(timeout_s)
    if child.is_alive():
        child.kill()
        raise AssertionError(f"timed out after {timeout_s} s")
    assert child.exitcode == 0, (f"child died from signal {-child.exitcode}" if child.exitcode < 0
                                 else "child failed (traceback above)")


def _child(fn: Callable[[], None]) -> None:
    # The parent's OpenMP worker threads do not exist in a forked child: stay single-threaded.
    torch.set_num_threads(1)
    try:
        fn()
    except BaseException:  # report and fail the child, whatever went wrong
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


@dataclass
class Poison:
    """One poisoned input: ``apply`` edits a case in place; rows of ``seq`` must come out NaN."""

    name: str
    seq: int
    apply: Callable[[PagedCase], None]


def _set_block(seq: int, token: int, value: int) -> Callable[[PagedCase], None]:
    def apply(case: PagedCase) -> None:
        case.block_tables[seq, token // case.k_cache.shape[1]] = value
    return apply


def _set_len(seq: int, value: Callable[[PagedCase], int]) -> Callable[[PagedCase], None]:
    def apply(case: PagedCase) -> None:
        case.seq_lens[seq] = value(case)
    return apply


def decode_poisons(long_len: int) -> list[Poison]:
    """Block ids just past the pool, negative and huge; seq_lens past M * P and negative; a bad
    id only in the last split-KV partition of a ``long_len``-token sequence (sequence 2)."""
    max_kv = lambda c: c.block_tables.shape[1] * c.k_cache.shape[1]
    return [
        Poison("block_id_N", 1, lambda c: _set_block(1, 0, c.k_cache.shape[0])(c)),
        Poison("block_id_-1", 0, _set_block(0, 3, -1)),
        Poison("block_id_1e8", 1, _set_block(1, 0, 10**8)),
        Poison("seq_len_past_table", 0, _set_len(0, lambda c: max_kv(c) + 1)),
        Poison("seq_len_negative", 1, _set_len(1, lambda c: -5)),
        Poison("bad_block_last_partition", 2, _set_block(2, long_len - 2, -(2**31))),
    ]


def decode_case(long_len: int, dtype: torch.dtype = torch.float32, head_dim: int = 64,
                block_size: int = 16) -> PagedCase:
    return make_case([37, 20, long_len, 9], num_qo_heads=4, num_kv_heads=2, head_dim=head_dim,
                     block_size=block_size, dtype=dtype)


def check_decode_guard(run: Callable[[PagedCase, torch.Tensor], None], case: PagedCase,
                       poison: Poison) -> None:
    """run(case, out) writes the decode output into ``out``. The poisoned sequence's rows are
    NaN, every other row equals the clean run's, and no fence around the caches, the block
    table or the output changed."""
    clean = torch.full_like(case.query, math.nan)
    run(case, clean)
    bad = replace(case, block_tables=case.block_tables.clone(), seq_lens=case.seq_lens.clone())
    poison.apply(bad)
    k_buf, k_cache = fenced(case.k_cache)
    v_buf, v_cache = fenced(case.v_cache)
    out_buf, out = fenced(torch.zeros_like(case.query))
    run(replace(bad, k_cache=k_cache, v_cache=v_cache), out)
    assert out[poison.seq].isnan().all(), f"{poison.name}: rows not flagged"
    others = [b for b in range(out.shape[0]) if b != poison.seq]
    assert torch.equal(out[others], clean[others]), f"{poison.name}: other rows changed"
    assert fence_intact(out_buf) and fence_intact(k_buf) and fence_intact(v_buf)
    assert torch.equal(k_cache, case.k_cache) and torch.equal(v_cache, case.v_cache)


def check_append_guard(run: Callable[..., None], device: torch.device,
                       dtype: torch.dtype = torch.float16) -> None:
    """run(key, value, k_cache, v_cache, slots): slots one past the pool, huge and negative are
    skipped, the valid ones written, and the fences around the pools untouched."""
    n, p, hkv, d = 5, 4, 2, 32
    k_buf, k_cache = fenced(torch.randn(n, p, hkv, d).to(device, dtype))
    v_buf, v_cache = fenced(torch.randn(n, p, hkv, d).to(device, dtype))
    slots = torch.tensor([3, n * p, 10**12, -7, n * p - 1, -(2**62)], dtype=torch.int64,
                         device=device)
    key = torch.randn(len(slots), hkv, d).to(device, dtype)
    value = torch.randn(len(slots), hkv, d).to(device, dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t in (0, 4):
        s = int(slots[t])
        want_k[s // p, s % p], want_v[s // p, s % p] = key[t], value[t]
    run(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert fence_intact(k_buf) and fence_intact(v_buf)


def packed_case(dtype: torch.dtype = torch.float32) -> PagedCase:
    """Three sequences of 9, 30 and 6 query tokens (the second over a cached prefix)."""
    return make_case([9, 41, 6], q_lens=[9, 30, 6], num_qo_heads=4, num_kv_heads=2, head_dim=64,
                     block_size=8, dtype=dtype)


def packed_poisons() -> list[tuple[str, Callable[[PagedCase], None], list[int]]]:
    """(name, edit, token rows that must come out NaN) of inconsistent packed inputs: a query
    range longer than the sequence's KV, an end past num_tokens, a decreasing range, a negative
    start, and a bad block id at the end of a table (every row of that sequence is flagged, also
    the early ones whose causal range stops before it)."""
    def cu(values: list[int]) -> Callable[[PagedCase], None]:
        return lambda c: c.cu_seqlens_q.copy_(torch.tensor(values, dtype=torch.int32))
    def both(*edits):
        return lambda c: [e(c) for e in edits]
    return [
        ("q_len_past_seq_len", _set_len(2, lambda c: 4), list(range(39, 45))),
        ("end_past_num_tokens", cu([0, 9, 39, 50]), list(range(39, 45))),
        ("decreasing", cu([0, 12, 9, 45]), []),
        ("negative_start", cu([-3, 9, 39, 45]), list(range(0, 9))),
        ("bad_block_at_the_end", _set_block(1, 40, -1), list(range(9, 39))),
        ("two_bad", both(_set_block(0, 0, 10**8), _set_len(2, lambda c: -1)),
         list(range(0, 9)) + list(range(39, 45))),
    ]


def check_packed_guard(run: Callable[[PagedCase, torch.Tensor], None], case: PagedCase,
                       edit: Callable[[PagedCase], None], nan_rows: list[int]) -> None:
    """Rows of flagged sequences are NaN; rows of sequences left intact equal the clean run;
    nothing outside the output or the caches changed."""
    clean = torch.full_like(case.query, math.nan)
    run(case, clean)
    bad = replace(case, block_tables=case.block_tables.clone(), seq_lens=case.seq_lens.clone(),
                  cu_seqlens_q=case.cu_seqlens_q.clone())
    edit(bad)
    k_buf, k_cache = fenced(case.k_cache)
    v_buf, v_cache = fenced(case.v_cache)
    out_buf, out = fenced(torch.zeros_like(case.query))
    run(replace(bad, k_cache=k_cache, v_cache=v_cache), out)
    if nan_rows:
        assert out[nan_rows].isnan().all(), "rows of a guarded sequence not flagged"
    intact = _intact_rows(case, bad)
    assert torch.equal(out[intact], clean[intact]), "rows of a valid sequence changed"
    assert fence_intact(out_buf) and fence_intact(k_buf) and fence_intact(v_buf)


def _intact_rows(case: PagedCase, bad: PagedCase) -> list[int]:
    """Token rows of the sequences whose inputs the edit left unchanged."""
    rows = []
    cu = case.cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        same = (torch.equal(case.block_tables[b], bad.block_tables[b])
                and case.seq_lens[b] == bad.seq_lens[b]
                and cu[b] == int(bad.cu_seqlens_q[b]) and cu[b + 1] == int(bad.cu_seqlens_q[b + 1]))
        if same:
            rows += list(range(cu[b], cu[b + 1]))
    return rows

