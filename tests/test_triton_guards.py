"""Device-side guards of the Triton kernels, under the interpreter (or on a GPU): poisoned block
ids, seq_lens, cu_seqlens_q and slots, passed straight to the backend (bypassing the public ops'
validation), flag the affected rows with NaN and never read or write outside the tensors.
Scenarios and checks: tests/guard_cases.py."""

from __future__ import annotations

import pytest
import torch

import guard_cases
from fastdecode import ops

if not ops.is_available("triton"):
    pytest.skip("triton backend unavailable", allow_module_level=True)

from fastdecode.triton import attention, kv_cache  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LONG = 100  # tokens of the multi-partition sequence
PARTITION = 32


def _run(c, out: torch.Tensor, partition_size: int | None = None) -> None:
    attention.paged_attention(c.query, c.k_cache, c.v_cache, c.block_tables, c.seq_lens,
                              c.cu_seqlens_q, out, scale=0.125, causal=True, softcap=0.0,
                              sliding_window=0, alibi_slopes=None,
                              partition_size=partition_size)


@pytest.mark.parametrize("poison", guard_cases.decode_poisons(LONG), ids=lambda p: p.name)
def test_decode_guards(poison):
    case = guard_cases.decode_case(LONG, dtype=torch.bfloat16).to(DEV)
    guard_cases.run_isolated(lambda: guard_cases.check_decode_guard(
        lambda c, out: _run(c, out, PARTITION), case, poison), DEV)


@pytest.mark.parametrize("name, edit, nan_rows", guard_cases.packed_poisons(),
                         ids=[p[0] for p in guard_cases.packed_poisons()])
def test_packed_guards(name, edit, nan_rows):
    case = guard_cases.packed_case().to(DEV)
    guard_cases.run_isolated(
        lambda: guard_cases.check_packed_guard(_run, case, edit, nan_rows), DEV)


def test_append_kv_guards():
    guard_cases.run_isolated(
        lambda: guard_cases.check_append_guard(kv_cache.append_kv, DEV), DEV)


def test_batch_dependent_ints_are_not_specialised():
    """Integers that change with the batch never select a compiled variant (a new batch size
    would otherwise cost a compile of seconds)."""
    from fastdecode.triton import sampling_kernels

    expected = {attention._paged_attention_kernel: attention._BATCH_ARGS,
                attention._merge_partitions_kernel: ["max_kv_len", "max_partitions"],
                sampling_kernels._repetition_penalty_kernel: ["stride_sb", "num_seen", "chunks"],
                sampling_kernels._stats_kernel: ["num_splits", "chunks"],
                sampling_kernels._radix_kernel: sampling_kernels.SHAPE_ARGS,
                sampling_kernels._final_kernel: sampling_kernels.SHAPE_ARGS,
                sampling_kernels._draw_kernel: sampling_kernels.SHAPE_ARGS}
    for kernel, names in expected.items():
        # A JITFunction keeps the list; the interpreter's wrapper keeps the jit arguments.
        listed = getattr(kernel, "do_not_specialize", None)
        if listed is None:
            listed = kernel.kwargs.get("do_not_specialize", ())
        excluded = {kernel.arg_names[i] if isinstance(i, int) else i for i in listed}
        assert set(names) <= excluded, kernel.arg_names
