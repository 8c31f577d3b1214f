"""Error paths of the CUDA paged_attention adapter, one per process: ``python
tests/cuda_adapter_errors.py CASE`` calls ``torch.ops.fastdecode.paged_attention`` directly with
the inputs of CASE and prints ``raised <ExceptionType>: <first line>``; a crash shows as the
process's exit status. The cases differ in where the adapter throws (before or after the shared
checks, inside them) and in what the message formats (strings only, integers), so a crash in one
of them says which path is at fault (on an H100 the two that format an integer once killed their
process, before the messages were built without iostreams: csrc/common/message.h)."""

from __future__ import annotations

import sys

import torch

import fastdecode._C  # noqa: F401  (registers torch.ops.fastdecode.*)


def _inputs(d: int, *, tokens: int = 1, misaligned: bool = False):
    """query/out [tokens, 2, d], caches [3, 16, 1, d] fp16 (2 bytes off 16-byte alignment when
    ``misaligned``), block_tables [1, 1], seq_lens [1]."""
    n = 3 * 16 * d
    flat_k = torch.randn(n + 1, device="cuda", dtype=torch.float16)
    flat_v = torch.randn(n + 1, device="cuda", dtype=torch.float16)
    start = 1 if misaligned else 0
    k_cache = flat_k[start:start + n].view(3, 16, 1, d)
    v_cache = flat_v[start:start + n].view(3, 16, 1, d)
    query = torch.randn(tokens, 2, d, device="cuda", dtype=torch.float16)
    block_tables = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([5], dtype=torch.int32, device="cuda")
    return torch.empty_like(query), query, k_cache, v_cache, block_tables, seq_lens


# case: (inputs, cu_seqlens_q) — expected message in test_cuda_specific.ADAPTER_ERRORS.
CASES = {
    "packed_form": (dict(d=64), True),           # throws first thing, strings only
    "decode_tokens": (dict(d=64, tokens=2), False),  # throws inside the shared checks, ints
    "head_dim_72": (dict(d=72), False),          # throws after the shared checks, an int
    "misaligned_cache": (dict(d=64, misaligned=True), False),  # after them, strings only
}


def main(case: str) -> None:
    kwargs, packed = CASES[case]
    out, query, k_cache, v_cache, block_tables, seq_lens = _inputs(**kwargs)
    cu = torch.tensor([0, query.shape[0]], dtype=torch.int32, device="cuda") if packed else None
    try:
        torch.ops.fastdecode.paged_attention(out, query, k_cache, v_cache, block_tables,
                                             seq_lens, cu, 0.1, True, 0.0, 0, None)
        torch.cuda.synchronize()
        print("returned")
    except Exception as exc:  # noqa: BLE001  (the parent test judges the type)
        print(f"raised {type(exc).__name__}: {str(exc).splitlines()[0]}")


if __name__ == "__main__":
    main(sys.argv[1])
