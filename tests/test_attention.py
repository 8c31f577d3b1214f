"""paged_attention on every backend against the float64 reference (2x rule, poisoned outputs).

Parameters are combined pairwise (tests/pairwise.py). Interpreted Triton shrinks batch sizes and
lengths, never a case.
"""

from __future__ import annotations

import pytest
import torch

import fastdecode.ops as ops
from paged_cases import check_against_reference, check_attention, kv_lengths, make_case
from pairwise import cases

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 80, 96, 112, 128, 256]  # 112: torch / cpu / triton only
HEADS = [(4, 4), (4, 2), (8, 2), (14, 2), (6, 1)]  # (Hq, Hkv): GQA 1, 2, 4, 7, MQA
FEATURES = ["plain", "softcap", "window", "alibi", "all"]
PACKED = [False, pytest.param(True, marks=pytest.mark.ops("paged_prefill"))]  # decode / packed


def feature_kwargs(feature: str, num_qo_heads: int) -> dict:
    """Keyword arguments of one feature mix. ALiBi slopes are the usual geometric sequence."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_qo_heads + 1) / num_qo_heads)
    return {"plain": {}, "softcap": {"softcap": 2.0}, "window": {"sliding_window": 7},
            "alibi": {"alibi_slopes": slopes},
            "all": {"softcap": 3.0, "sliding_window": 3, "alibi_slopes": slopes}}[feature]


def skip_unsupported(backend, head_dim: int) -> None:
    dims = getattr(ops._backends._load(backend.name), "SUPPORTED_HEAD_DIMS", None)
    if dims is not None and head_dim not in dims:
        pytest.skip(f"backend {backend} does not build head_dim {head_dim}")


@pytest.mark.parametrize(*cases({"dtype": DTYPES, "head_dim": HEAD_DIMS, "heads": HEADS,
                                 "block_size": [1, 16, 256], "batch": [1, 3, 17],
                                 "feature": FEATURES}))
def test_decode(backend, dtype, head_dim, heads, block_size, batch, feature):
    skip_unsupported(backend, head_dim)
    if backend.interpreted or block_size == 256:  # the float64 reference is a Python loop
        batch = min(batch, 5)
    lens = kv_lengths(block_size, batch)
    lens[-1] = 0 if batch > 2 else lens[-1]  # a CUDA-graph padding row
    case = make_case(lens, num_qo_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                     block_size=block_size, dtype=dtype)
    out = check_attention(backend, case, **feature_kwargs(feature, heads[0]))
    assert (out[torch.tensor(lens) == 0] == 0).all()


def packed_rows(block_size: int, shrink: bool) -> tuple[list[int], list[int]]:
    """(seq_lens, q_lens) of a mixed batch: prefill, decode, chunked prefill over a cached prefix,
    a sequence without query tokens, and a prefill longer than one work chunk."""
    p = block_size
    edge = max(p - 1, 1)  # a chunk ending just before a block boundary
    rows = [(13, 13), (p + 1, 1), (p + 9, 3), (0, 0), (5, 1), (edge, min(edge, 3))]
    if shrink:
        rows = [(n // 2 or n, (q // 2 or q) if q < n else (n // 2 or n)) for n, q in rows]
    return [n for n, _ in rows], [q for _, q in rows]


@pytest.mark.ops("paged_prefill")
@pytest.mark.parametrize(*cases({"dtype": DTYPES, "head_dim": HEAD_DIMS, "heads": HEADS,
                                 "block_size": [1, 16, 256], "causal": [True, False],
                                 "feature": FEATURES}, seed=1))
def test_packed(backend, dtype, head_dim, heads, block_size, causal, feature):
    skip_unsupported(backend, head_dim)
    seq_lens, q_lens = packed_rows(block_size, backend.interpreted)
    case = make_case(seq_lens, q_lens=q_lens, num_qo_heads=heads[0], num_kv_heads=heads[1],
                     head_dim=head_dim, block_size=block_size, dtype=dtype)
    check_attention(backend, case, causal=causal, **feature_kwargs(feature, heads[0]))


@pytest.mark.ops("paged_prefill")
@pytest.mark.parametrize("window", [None, 1, 16, 40])
def test_long_prefill(backend, window):
    """A prefill spanning many KV tiles and query chunks; window 1 sees only the diagonal."""
    n = 50 if backend.interpreted else 130
    case = make_case([n, 3], q_lens=[n - 20, 3], num_qo_heads=2, num_kv_heads=1, head_dim=64,
                     block_size=16, dtype=torch.float32)
    check_attention(backend, case, sliding_window=window)


@pytest.mark.parametrize("packed", PACKED)
def test_noncontiguous_query(backend, packed):
    """query sliced out of a fused qkv projection: strides (row, D, 1), not contiguous."""
    hq, hkv, d = 8, 2, 96
    lens = [17, 33, 1]
    q_lens = [5, 1, 1] if packed else None
    case = make_case(lens, q_lens=q_lens, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d,
                     block_size=16, dtype=torch.bfloat16)
    fused = torch.randn(case.query.shape[0], (hq + 2 * hkv) * d, device=backend.device)
    query = fused.to(torch.bfloat16)[:, : hq * d].view(-1, hq, d)
    assert not query.is_contiguous()
    case.query = query.cpu()
    check_attention(backend, case, query=query)


@pytest.mark.parametrize("packed", PACKED)
def test_batch_invariance(backend, packed):
    """A sequence's output is bitwise the same alone as in a batch."""
    lens = [300, 17, 1, 64, 129]
    q_lens = [40, 1, 1, 64, 2] if packed else None
    case = make_case(lens, q_lens=q_lens, num_qo_heads=8, num_kv_heads=2, head_dim=64,
                     block_size=16, dtype=torch.bfloat16).to(backend.device)
    kw = dict(cu_seqlens_q=case.cu_seqlens_q, backend=backend.name)
    batched = ops.paged_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                                  case.seq_lens, **kw)
    starts = case.cu_seqlens_q.tolist() if packed else list(range(len(lens) + 1))
    for b in range(len(lens)):
        rows = slice(starts[b], starts[b + 1])
        cu = None
        if packed:
            cu = torch.tensor([0, starts[b + 1] - starts[b]], dtype=torch.int32,
                              device=backend.device)
        alone = ops.paged_attention(case.query[rows], case.k_cache, case.v_cache,
                                    case.block_tables[b:b + 1], case.seq_lens[b:b + 1],
                                    cu_seqlens_q=cu, backend=backend.name)
        assert torch.equal(alone, batched[rows]), f"sequence {b} depends on its batchmates"


def test_high_block_ids(backend):
    """Offsets past 2^31 elements: a float16 cache of 2^31 + 2^14 elements per tensor (4 GiB of
    address space, but only the blocks written here are ever touched) holding the sequences in
    its last blocks, so block_id * block_stride and slot * token_stride need 64 bits.
    Interpreted Triton copies whole tensors, so it gets a small pool with the same layout."""
    p, hkv, d = 16, 1, 128
    n_blocks = 64 if backend.interpreted else 2**20 + 8
    try:
        k_cache = torch.empty(n_blocks, p, hkv, d, dtype=torch.float16, device=backend.device)
        v_cache = torch.empty_like(k_cache)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve the large cache: {exc}")
    lens = torch.tensor([3 * p + 5, p], dtype=torch.int32)
    tables = torch.tensor([[n_blocks - 1, n_blocks - 3, n_blocks - 8, 1],
                           [n_blocks - 2, 0, 0, 0]], dtype=torch.int32)
    slots = torch.cat([tables[b, torch.arange(n) // p].long() * p + torch.arange(n) % p
                       for b, n in enumerate(lens.tolist())])
    key, value = (torch.randn(len(slots), hkv, d).half() for _ in range(2))
    ops.append_kv(key.to(backend.device), value.to(backend.device), k_cache, v_cache,
                  slots.to(backend.device), backend=backend.name)
    query = torch.randn(2, 4, d).half()
    out = ops.paged_attention(query.to(backend.device), k_cache, v_cache,
                              tables.to(backend.device), lens.to(backend.device),
                              backend=backend.name)
    # Reference: a compact CPU copy of the used blocks, with the table renumbered.
    used = tables.unique()
    index = {int(b): i for i, b in enumerate(used)}
    small_k = k_cache[used.to(backend.device)].cpu()
    small_v = v_cache[used.to(backend.device)].cpu()
    check_against_reference(out, query, small_k, small_v, tables.clone().apply_(index.get), lens)


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.parametrize("softcap", [1e3, 1e5, 1e7])
def test_large_softcap(backend, softcap, packed):
    """softcap * tanh(s / softcap) ~ s when softcap >> |s|: every logit maps to a tiny tanh
    argument, where tanh's usual (1 - e) / (1 + e) form cancels. The result must still pass the
    2x rule against float64, in the decode and the packed form."""
    case = make_case([37, 5, 16], q_lens=[9, 1, 16] if packed else None, num_qo_heads=4,
                     num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    case.query *= 4  # logits of a few units: larger than the float32 rounding they would show
    check_attention(backend, case, softcap=softcap)
