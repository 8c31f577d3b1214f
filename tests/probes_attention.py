"""Reliability probes of ``paged_attention`` and ``append_kv`` through the public ops.

One small case (2 sequences of 9 and 4 KV tokens in a cache of 8 blocks of 4, tables 3 wide:
12 positions) spoiled one argument at a time. Out-of-range values must give a ValueError naming
the entry where values are checked on the host, and the guard contract of
:mod:`fastdecode.ops.attention` (bad sequence's rows NaN, bad slots skipped, nothing else
touched) where they are not: CUDA tensors outside the debug mode, and the ``*_unchecked`` ops
(whose ``cpu`` backend raises ValueError from its C++ checks instead).
"""

from __future__ import annotations

import torch

import fastdecode.ops as ops
import reference
from probe_kit import Target, assert_close, assert_nan, expect_error, probe

N, P, HKV, D, HQ = 8, 4, 2, 32, 4
SEQ_LENS = (9, 4)
TABLES = ((5, 2, 7), (1, 0, 3))
CU = (0, 3, 5)  # packed form: 3 + 2 query tokens
def attn_args(t: Target, packed: bool = False, **change) -> dict:
    """The case's paged_attention arguments on ``t.device``; each ``change`` value replaces an
    argument (a callable gets the arguments and returns the replacement)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(t.device)

    args = dict(query=randn(CU[-1] if packed else len(SEQ_LENS), HQ, D),
                k_cache=randn(N, P, HKV, D), v_cache=randn(N, P, HKV, D),
                block_tables=torch.tensor(TABLES, dtype=torch.int32, device=t.device),
                seq_lens=torch.tensor(SEQ_LENS, dtype=torch.int32, device=t.device))
    if packed:
        args["cu_seqlens_q"] = torch.tensor(CU, dtype=torch.int32, device=t.device)
    for name, value in change.items():
        args[name] = value(args) if callable(value) else value
    return args


def entry(name: str, index, value: int, dtype: torch.dtype = torch.int32):
    """A change: argument ``name`` as ``dtype`` with ``[index]`` set to ``value``."""
    def change(args):
        spoilt = args[name].to(dtype)
        spoilt[index] = value
        return spoilt
    return change


def attention(t: Target, packed: bool = False, unchecked: bool = False, **change):
    op = ops.paged_attention_unchecked if unchecked else ops.paged_attention
    return op(**attn_args(t, packed, **change), backend=t.backend)


def expected_rows(t: Target, packed: bool, **change) -> torch.Tensor:
    """The float64 reference of the case (with ``change`` where it keeps the case valid)."""
    a = {k: v.cpu() if isinstance(v, torch.Tensor) else v
         for k, v in attn_args(t, packed, **change).items()}
    return reference.paged_attention(a.pop("query"), a.pop("k_cache"), a.pop("v_cache"),
                                     a.pop("block_tables"), a.pop("seq_lens"), **a)


def guarded(t: Target, bad_rows, packed: bool, unchecked: bool, **change) -> None:
    """The guard contract: rows ``bad_rows`` NaN, every other row as in the unspoilt case."""
    out = attention(t, packed, unchecked, **change).cpu()
    good = torch.ones(out.shape[0], dtype=torch.bool)
    good[list(bad_rows)] = False
    assert_nan(out[~good], f"rows {list(bad_rows)}")
    expected = expected_rows(t, packed)[: out.shape[0]]
    assert_close(out[good], expected[good[: expected.shape[0]]], "the other rows")


def bad_values(name: str, bad_rows, words, packed: bool = False, **change) -> None:
    """Register the checked and the unchecked probe of one out-of-range value."""
    category = "out-of-range ids" if "wide" not in name else "ids beyond int32"

    def checked(t: Target) -> None:
        if t.host_checked:
            expect_error(lambda: attention(t, packed, **change), ValueError, *words)
        else:
            guarded(t, bad_rows, packed, False, **change)

    def unchecked(t: Target) -> None:
        if t.backend == "cpu":  # the C++ adapter checks values itself
            expect_error(lambda: attention(t, packed, True, **change), ValueError, words[0])
        else:
            guarded(t, bad_rows, packed, True, **change)

    probe(category)(_named(checked, name))
    probe("unchecked entry points")(_named(unchecked, "unchecked_" + name))


def _named(fn, name: str):
    fn.__name__ = name
    return fn


# --------------------------------------------------------------- block ids, lengths, offsets
for suffix, value in (("huge", 10**8), ("n", N), ("minus1", -1)):
    bad_values(f"block_id_{suffix}", [0], ["block_tables[0, 1]", str(value)],
               block_tables=entry("block_tables", (0, 1), value))
    bad_values(f"packed_block_id_{suffix}", [0, 1, 2], ["block_tables[0, 1]"], packed=True,
               block_tables=entry("block_tables", (0, 1), value))
for suffix, value in (("wide", 2**32 + 1), ("wide_negative", -2**32 + 1)):
    bad_values(f"block_id_{suffix}", [0], ["block_tables[0, 1]", str(value)],
               block_tables=entry("block_tables", (0, 1), value, torch.int64))
for suffix, value in (("over", 13), ("negative", -1), ("wide", 2**32 + 1)):
    bad_values(f"seq_len_{suffix}", [1], ["seq_lens[1]", str(value)],
               seq_lens=entry("seq_lens", 1, value, torch.int64))


def offsets(values: list[int]):
    """A change: cu_seqlens_q = ``values`` (int64, so wide values stay wide)."""
    return lambda a: torch.tensor(values, device=a["query"].device)


# The case: 3 query tokens, offsets [0, 4, 3].
bad_values("cu_seqlens_not_monotonic", [0, 1, 2], ["cu_seqlens_q must be non-decreasing"],
           packed=True, query=lambda a: a["query"][:3], cu_seqlens_q=offsets([0, 4, 3]))
# One query token more than the offsets cover: no sequence owns row 5.
bad_values("cu_seqlens_short_of_end", [5], ["cu_seqlens_q must run from 0"], packed=True,
           query=lambda a: torch.cat([a["query"], a["query"][:1]]))
for name, cu, rows, words in (
        ("cu_seqlens_not_from_zero", [1, 3, 5], [0], "cu_seqlens_q must run from 0"),
        ("cu_seqlens_past_end", [0, 3, 6], [3, 4], "cu_seqlens_q must run from 0"),
        ("cu_seqlens_negative", [0, -1, 5], [0, 1, 2, 3, 4], "non-decreasing"),
        ("cu_seqlens_wide", [0, 2**32 + 3, 5], [0, 1, 2, 3, 4], "non-decreasing")):
    bad_values(name, rows, [words], packed=True, cu_seqlens_q=offsets(cu))
bad_values("cu_seqlens_more_queries_than_kv", [0, 1, 2], ["cu_seqlens_q gives seq 0"],
           packed=True, seq_lens=entry("seq_lens", 0, 2))


def append(t: Target, slots: list[int], unchecked: bool = False, **change) -> tuple:
    """append_kv of len(slots) random tokens; returns (k_cache before, k_cache after, key)."""
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(N, P, HKV, D, generator=g).to(t.device)
    args = dict(key=torch.randn(len(slots), HKV, D, generator=g).to(t.device),
                value=torch.randn(len(slots), HKV, D, generator=g).to(t.device),
                k_cache=k_cache, v_cache=k_cache.clone() + 1,
                slot_mapping=torch.tensor(slots, dtype=torch.int64, device=t.device))
    args.update({k: v(args) if callable(v) else v for k, v in change.items()})
    before = args["k_cache"].clone()
    (ops.append_kv_unchecked if unchecked else ops.append_kv)(**args, backend=t.backend)
    return before, args["k_cache"], args["key"]


def expect_appended(t: Target, slots: list[int], unchecked: bool) -> None:
    """Every slot in [0, N * P) written, every other one untouched."""
    before, after, key = append(t, slots, unchecked)
    expected = before.clone().view(N * P, HKV, D)
    for i, s in enumerate(slots):
        if 0 <= s < N * P:
            expected[s] = key[i]
    assert torch.equal(after.view(N * P, HKV, D).cpu(), expected.cpu()), "wrong cache contents"


def bad_slot(name: str, slots: list[int], bad: int) -> None:
    def checked(t: Target) -> None:
        if t.host_checked:
            expect_error(lambda: append(t, slots), ValueError, f"slot_mapping[{bad}]")
        else:
            expect_appended(t, slots, False)

    def unchecked(t: Target) -> None:
        if t.backend == "cpu":
            expect_error(lambda: append(t, slots, True), ValueError, f"slot_mapping[{bad}]")
        else:
            expect_appended(t, slots, True)

    probe("out-of-range ids")(_named(checked, name))
    probe("unchecked entry points")(_named(unchecked, "unchecked_" + name))


bad_slot("slot_one_past_end", [3, N * P, 7], 1)
bad_slot("slot_huge", [2**40, 3], 0)


@probe("valid edge cases")
def slot_negative_skips(t: Target) -> None:
    expect_appended(t, [-5, 3, -1, 30], False)


@probe("unchecked entry points")
def unchecked_valid_inputs(t: Target) -> None:
    for packed in (False, True):
        out = attention(t, packed, unchecked=True)
        assert_close(out, expected_rows(t, packed), f"packed={packed}")
