"""Concerns of the hand-written CUDA backend that the shared op tests do not reach: split-KV
partition boundaries, batch invariance across grid shapes, int64 cache offsets, CUDA-graph
capture, torch.compile, the unsupported-head_dim error and the device-side guards (poisoned
indices straight to the kernels). Skipped without a GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdecode import ops
from fastdecode.ops import _backends
import guard_cases
import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PARTITION = 256  # kPartitionTokens in csrc/kernels/params.h


@pytest.fixture(autouse=True)
def _cuda_backend():
    if not _backends.is_available("cuda"):
        pytest.skip(f"CUDA backend unavailable: {_backends._load('cuda')}")


def _paged(lens, *, hq=8, hkv=2, d=128, p=16, dtype=torch.float16, extra_blocks=0, seed=0):
    """Random query [B, Hq, D] and caches whose blocks are handed out in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    m = max((n + p - 1) // p for n in lens) + extra_blocks
    n_blocks = len(lens) * m + 3
    k_cache = torch.randn(n_blocks, p, hkv, d, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(n_blocks, p, hkv, d, generator=gen).to("cuda", dtype)
    order = torch.randperm(n_blocks, generator=gen)[: len(lens) * m].view(len(lens), m)
    block_tables = order.to("cuda", torch.int32)
    query = torch.randn(len(lens), hq, d, generator=gen).to("cuda", dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, block_tables, seq_lens


def _check_against_reference(out, query, k_cache, v_cache, block_tables, seq_lens, **kw):
    cpu = [t.cpu() for t in (query, k_cache, v_cache, block_tables, seq_lens)]
    ref64 = reference.paged_attention(*cpu, **kw)
    ref_lowp = reference.paged_attention(*cpu, upcast=False, **kw)
    reference.assert_close_2x(out.cpu(), ref64, ref_lowp, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_split_kv_partition_boundaries(dtype):
    # 0 and 1 partition (direct write), exactly one, one + 1 token, several, a ragged tail.
    lens = [0, 1, PARTITION - 1, PARTITION, PARTITION + 1, 3 * PARTITION, 5 * PARTITION - 17]
    query, k_cache, v_cache, block_tables, seq_lens = _paged(lens, dtype=dtype, hq=7, hkv=1)
    out = torch.full_like(query, float("nan"))
    ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, out=out, backend="cuda")
    assert not out.isnan().any(), "every output element must be written"
    assert (out[0] == 0).all(), "seq_len 0 gives zeros"
    _check_against_reference(out, query, k_cache, v_cache, block_tables, seq_lens)


@pytest.mark.parametrize("window, softcap", [(PARTITION + 5, None), (17, 30.0), (None, 50.0)])
def test_split_kv_with_window_and_softcap(window, softcap):
    # A window shorter than the sequence leaves whole partitions empty (lse = -inf).
    lens = [3 * PARTITION + 9, PARTITION + 1, 40]
    query, k_cache, v_cache, block_tables, seq_lens = _paged(lens, hq=4, hkv=4, d=64)
    slopes = torch.linspace(0.01, 0.3, 4, device="cuda")
    out = ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                              sliding_window=window, softcap=softcap, alibi_slopes=slopes,
                              backend="cuda")
    _check_against_reference(out, query, k_cache, v_cache, block_tables, seq_lens,
                             sliding_window=window, softcap=softcap, alibi_slopes=slopes.cpu())


def test_batch_invariance_across_grid_shapes():
    # The same sequence alone, with batchmates, and with a wider block table (more partitions
    # in the grid) must give bit-identical results.
    lens = [2 * PARTITION + 3, 7, 4 * PARTITION]
    query, k_cache, v_cache, block_tables, seq_lens = _paged(lens, hq=16, hkv=2, extra_blocks=40)
    together = ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                   backend="cuda")
    m0 = (lens[0] + 15) // 16
    for table in (block_tables[:1, :m0], block_tables[:1]):
        alone = ops.paged_attention(query[:1], k_cache, v_cache, table, seq_lens[:1],
                                    backend="cuda")
        assert torch.equal(alone[0], together[0])


def test_large_cache_int64_offsets():
    # block * stride exceeds 2**31 elements for the last blocks of a ~4.3 GB fp16 pool.
    p, hkv, d = 16, 8, 128
    n_blocks = 2**31 // (p * hkv * d) + 64
    k_cache = torch.empty(n_blocks, p, hkv, d, dtype=torch.float16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    tail = torch.arange(n_blocks - 40, n_blocks, device="cuda")
    k_cache[tail] = torch.randn(40, p, hkv, d, device="cuda", dtype=torch.float16)
    v_cache[tail] = torch.randn(40, p, hkv, d, device="cuda", dtype=torch.float16)
    block_tables = tail.flip(0).to(torch.int32)[None]
    seq_lens = torch.tensor([40 * p - 3], dtype=torch.int32, device="cuda")
    query = torch.randn(1, 32, d, device="cuda", dtype=torch.float16)
    out = ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, backend="cuda")
    sub = (k_cache[tail], v_cache[tail])
    local = (block_tables - (n_blocks - 40)).to(torch.int32)
    _check_against_reference(out, query, *sub, local, seq_lens)

    key = torch.randn(3, hkv, d, device="cuda", dtype=torch.float16)
    slots = torch.tensor([(n_blocks - 1) * p + 5, -1, (n_blocks - 2) * p], device="cuda")
    ops.append_kv(key, key * 2, k_cache, v_cache, slots, backend="cuda")
    assert torch.equal(k_cache[n_blocks - 1, 5], key[0])
    assert torch.equal(v_cache[n_blocks - 2, 0], key[2] * 2)


def test_unaligned_out_and_strided_query():
    query, k_cache, v_cache, block_tables, seq_lens = _paged([33, 300], hq=8, hkv=8, d=80)
    fused = torch.cat([query, query], dim=1)[:, 3:11]  # a non-contiguous head slice
    flat = torch.empty(query.numel() + 1, dtype=query.dtype, device="cuda")
    out = flat[1:].view(query.shape)  # 2 bytes off 16-byte alignment
    ops.paged_attention(fused, k_cache, v_cache, block_tables, seq_lens, out=out, backend="cuda")
    _check_against_reference(out, fused, k_cache, v_cache, block_tables, seq_lens)


ADAPTER_ERRORS = {
    "packed_form": "decode form only",
    "decode_tokens": "the decode form takes one token per sequence, got 2 tokens for 1",
    "head_dim_72": r"unsupported head_dim 72 \(supported: 64, 80, 96, 128, 256\)",
    "misaligned_cache": "k_cache / v_cache must be 16-byte aligned",
}


def test_adapter_errors_raise_in_their_own_process():
    # Each case in a process of its own (tests/cuda_adapter_errors.py), all at once: a crash
    # names the failing path instead of taking the test session with it.
    script = Path(__file__).with_name("cuda_adapter_errors.py")
    procs = {case: subprocess.Popen([sys.executable, str(script), case], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for case in ADAPTER_ERRORS}
    outcomes = {case: (p.communicate(timeout=120)[0], p.returncode) for case, p in procs.items()}
    bad = {case: f"exit {rc}: {text.strip()[-300:]}" for case, (text, rc) in outcomes.items()
           if rc != 0 or not re.search(f"raised ValueError: .*{ADAPTER_ERRORS[case]}", text)}
    assert not bad, f"adapter error paths that did not raise ValueError: {bad}"


def test_unsupported_head_dim_is_unavailable_through_ops():
    query, k_cache, v_cache, block_tables, seq_lens = _paged([5], hq=2, hkv=1, d=72)
    with pytest.raises(ops.BackendUnavailableError, match="unsupported head_dim 72"):
        ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, backend="cuda")


def _sampling_args(batch: int, vocab: int):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to("cuda")
    rows = torch.arange(batch, device="cuda")
    params = (
        torch.where(rows % 3 == 0, 0.0, 0.7 + 0.1 * rows).float(),  # temperature, greedy rows
        torch.where(rows % 2 == 0, 50, 0).int(),                     # top_k
        torch.full((batch,), 0.9, device="cuda"),                    # top_p
        torch.full((batch,), 0.05, device="cuda"),                   # min_p
        torch.full((batch,), 1.3, device="cuda"),                    # repetition_penalty
        torch.randint(-1, vocab, (batch, 9), device="cuda"),         # seen_tokens
        torch.arange(batch, device="cuda") * 7919,                   # seeds
        torch.full((batch,), 11, device="cuda"),                     # offsets
    )
    return logits, params


def test_cuda_graph_capture_attention_and_sample():
    query, k_cache, v_cache, block_tables, seq_lens = _paged([700, 5, 0, 300], hq=8, hkv=2)
    out = torch.empty_like(query)
    logits, params = _sampling_args(5, 32003)
    attn = lambda: ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,  # noqa
                                       out=out, backend="cuda")
    draw = lambda: torch.ops.fastdecode.sample(logits, *params)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (module loading, allocator)
        attn(), draw()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn()
        ids = draw()
    query.copy_(torch.randn_like(query))
    seq_lens.copy_(torch.tensor([1, 600, 3, 0], dtype=torch.int32))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    expected = ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                   backend="cuda")
    assert torch.equal(out, expected)
    assert torch.equal(ids, torch.ops.fastdecode.sample(logits, *params))


def test_torch_compile_calls_the_ops():
    query, k_cache, v_cache, block_tables, seq_lens = _paged([70, 513], hq=4, hkv=4, d=96)
    logits, params = _sampling_args(2, 1000)

    def step(q, lg):
        out = torch.empty_like(q)
        torch.ops.fastdecode.paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens,
                                             None, 96 ** -0.5, True, 0.0, 0, None)
        return out * 2, torch.ops.fastdecode.sample(lg, *params)

    compiled = torch.compile(step, fullgraph=True)
    out_c, ids_c = compiled(query, logits)
    out_e, ids_e = step(query, logits)
    torch.testing.assert_close(out_c, out_e)
    assert torch.equal(ids_c, ids_e)


def test_sample_is_deterministic_and_batch_position_free():
    logits, params = _sampling_args(6, 151936)
    before = logits.clone()
    first = torch.ops.fastdecode.sample(logits, *params)
    assert torch.equal(first, torch.ops.fastdecode.sample(logits, *params))
    perm = torch.tensor([5, 3, 1, 0, 2, 4], device="cuda")
    permuted = torch.ops.fastdecode.sample(logits[perm], *(t[perm] for t in params))
    assert torch.equal(permuted, first[perm])
    assert torch.equal(logits, before), "sample must not modify the logits"


@pytest.mark.parametrize("poison", guard_cases.decode_poisons(PARTITION + 44),
                         ids=lambda p: p.name)
def test_decode_guards(poison):
    case = guard_cases.decode_case(PARTITION + 44, dtype=torch.float16).to("cuda")

    def run(c, out):
        torch.ops.fastdecode.paged_attention(out, c.query, c.k_cache, c.v_cache, c.block_tables,
                                             c.seq_lens, None, 0.125, True, 0.0, 0, None)
    guard_cases.check_decode_guard(run, case, poison)
    torch.cuda.synchronize()  # an illegal access would surface here


def test_append_kv_guards():
    guard_cases.check_append_guard(torch.ops.fastdecode.append_kv, torch.device("cuda"))
    torch.cuda.synchronize()
