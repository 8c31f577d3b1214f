"""Paged-KV test cases shared by the attention and append_kv tests.

A case is a random cache (never zeros) whose blocks are handed out in shuffled order, so a kernel
that assumes contiguous or identity block tables fails; unused table entries point at other
sequences' blocks, so reading past a sequence's length gives wrong numbers instead of passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

import fastdecode.ops as ops
import reference


@dataclass
class PagedCase:
    """query: [num_seqs or num_tokens, num_qo_heads, head_dim]; k_cache, v_cache: [num_blocks,
    block_size, num_kv_heads, head_dim]; block_tables: [num_seqs, max_blocks_per_seq] int32;
    seq_lens: [num_seqs] int32; cu_seqlens_q: [num_seqs + 1] int32 (packed form) or None."""

    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: Optional[torch.Tensor] = None

    def to(self, device) -> "PagedCase":
        move = (lambda t: None if t is None else t.to(device))
        return PagedCase(*(move(t) for t in (self.query, self.k_cache, self.v_cache,
                                              self.block_tables, self.seq_lens,
                                              self.cu_seqlens_q)))


def kv_lengths(block_size: int, batch: int) -> list[int]:
    """The awkward KV lengths 1, P-1, P, P+1, 3P (P=1 gives a seq_lens 0 row), cycled over the
    batch."""
    p = block_size
    cycle = [1, p - 1, p, p + 1, 3 * p if p < 256 else 2 * p]
    return [cycle[i % len(cycle)] for i in range(batch)]


def make_case(seq_lens: list[int], *, num_qo_heads: int, num_kv_heads: int, head_dim: int,
              block_size: int, dtype: torch.dtype, q_lens: Optional[list[int]] = None,
              spare_blocks: int = 3, num_blocks: Optional[int] = None) -> PagedCase:
    """A CPU case. q_lens None: decode form (one query per sequence); else packed form with
    q_lens[b] query tokens for sequence b (its last q_lens[b] KV positions)."""
    p = block_size
    need = [math.ceil(n / p) for n in seq_lens]
    max_blocks = max(need + [0]) + 1
    n_blocks = num_blocks or sum(need) + spare_blocks
    order = torch.randperm(n_blocks)
    tables = order[torch.randint(0, n_blocks, (len(seq_lens), max_blocks))]
    used = 0
    for b, k in enumerate(need):
        tables[b, :k] = order[used:used + k]
        used += k
    shape = (n_blocks, p, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    tokens = len(seq_lens) if q_lens is None else sum(q_lens)
    query = torch.randn(tokens, num_qo_heads, head_dim).to(dtype)
    cu = None
    if q_lens is not None:
        cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return PagedCase(query, k_cache, v_cache, tables.to(torch.int32),
                     torch.tensor(seq_lens, dtype=torch.int32), cu)


def check_attention(backend, case: PagedCase, query: Optional[torch.Tensor] = None,
                    **kwargs) -> torch.Tensor:
    """Run ``backend`` on ``case`` (a CPU case, moved to the backend's device; ``query``, if
    given, is used as is: it must equal ``case.query``) with a NaN-poisoned ``out``; check every
    element was written and the result passes the 2x rule against the float64 reference.
    Tensor ``kwargs`` (alibi_slopes) are CPU tensors, moved like the case.
    Returns the output (on the backend's device)."""
    dev = case.to(backend.device)
    dev_kwargs = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
    query = dev.query if query is None else query
    out = torch.full(query.shape, float("nan"), dtype=query.dtype, device=backend.device)
    res = ops.paged_attention(query, dev.k_cache, dev.v_cache, dev.block_tables, dev.seq_lens,
                              cu_seqlens_q=dev.cu_seqlens_q, out=out, backend=backend.name,
                              **dev_kwargs)
    assert res.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements never written"
    args = (case.query, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
            case.cu_seqlens_q)
    check_against_reference(out, *args, **kwargs)
    return out


def check_against_reference(out: torch.Tensor, *args, **kwargs) -> None:
    """2x rule for ``out`` against reference.paged_attention(*args, **kwargs) (CPU tensors)."""
    ref64 = reference.paged_attention(*args, **kwargs)
    ref_low = reference.paged_attention(*args, upcast=False, **kwargs)
    reference.assert_close_2x(out.cpu(), ref64, ref_low)
