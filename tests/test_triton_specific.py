"""Triton-only behaviour: split-KV partitions and their merge, the GQA row tiles, the packed grid,
workspace / plan contract, int64 cache offsets, the Philox stream and the radix-threshold sampler,
and the custom-op registration. Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (sizes
kept small there; every awkward case kept)."""

from __future__ import annotations

import pytest
import torch

import reference
from fastdecode import ops
from fastdecode.ops import torch_backend
from fastdecode.ops._params import normalize
from pairwise import cases

if not ops.is_available("triton"):
    pytest.skip("triton backend unavailable", allow_module_level=True)

from fastdecode.triton import attention, sampling  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INF = float("inf")


# ------------------------------------------------------------------------------------ attention
def make_cache(lens, block_size, num_kv_heads, head_dim, dtype, spare_blocks=2):
    """Random paged cache with shuffled blocks; unused table entries point at a NaN block, so a
    read past a sequence's end shows up in its output."""
    blocks = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks) + spare_blocks + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, dtype=dtype, device=DEV)
    v = torch.randn(shape, dtype=dtype, device=DEV)
    poison = num_blocks - 1
    k[poison] = float("nan")
    v[poison] = float("nan")
    perm = torch.randperm(num_blocks - 1).tolist()
    table = torch.full((len(lens), max(max(blocks), 1) + 1), poison, dtype=torch.int32)
    for b, nb in enumerate(blocks):
        table[b, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
    return k, v, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def run_triton(query, k, v, table, lens, cu=None, partition_size=None, workspace=None, **kw):
    out = torch.full_like(query, float("nan"))  # poison: every element must be written
    attention.paged_attention(
        query, k, v, table, lens, cu, out, scale=query.shape[-1] ** -0.5,
        causal=kw.get("causal", True), softcap=kw.get("softcap") or 0.0,
        sliding_window=kw.get("sliding_window") or 0, alibi_slopes=kw.get("alibi_slopes"),
        workspace=workspace, partition_size=partition_size)
    return out


def check(out, query, k, v, table, lens, cu=None, **kw):
    args = [t.cpu() for t in (query, k, v, table, lens)] + [None if cu is None else cu.cpu()]
    kw = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    ref64 = reference.paged_attention(*args, **kw)
    ref_lowp = reference.paged_attention(*args, upcast=False, **kw)
    assert not out.isnan().any(), "unwritten or poisoned output"
    reference.assert_close_2x(out.cpu(), ref64, ref_lowp, atol=1e-5 if query.dtype ==
                              torch.float32 else 1e-3)


def features(name, hq):
    return {"none": {}, "softcap": {"softcap": 3.0}, "window": {"sliding_window": 7},
            "alibi": {"alibi_slopes": torch.rand(hq, device=DEV)}}[name]


# (num_qo_heads, num_kv_heads): GQA 1, 2, 7, MQA, and groups past the 16-row decode tile.
HEADS = [(4, 4), (4, 2), (14, 2), (8, 1), (18, 1)]
# partition_size: one partition (default), 3 partitions of the longest sequence, partitions
# smaller than a block (more partitions than blocks).
DECODE = cases({"dtype": [torch.float32, torch.float16, torch.bfloat16],
                "head_dim": [64, 80, 96, 256], "heads": HEADS, "block_size": [16, 5],
                "partition_size": [None, 17, 4], "feature": ["none", "softcap", "window", "alibi"]})


@pytest.mark.parametrize(*DECODE)
def test_decode_split_kv(dtype, head_dim, heads, block_size, partition_size, feature):
    hq, hkv = heads
    p = block_size
    lens = [0, 1, p - 1, p, p + 1, 3 * p + 2]  # block boundaries; 0 = CUDA-graph padding row
    k, v, table, seq_lens = make_cache(lens, p, hkv, head_dim, dtype)
    query = torch.randn(len(lens), hq, head_dim, dtype=dtype, device=DEV)
    kw = features(feature, hq)
    out = run_triton(query, k, v, table, seq_lens, partition_size=partition_size, **kw)
    check(out, query, k, v, table, seq_lens, **kw)
    assert (out[0] == 0).all(), "seq_len 0 must give zeros"


def test_decode_partition_count_cases():
    """The test's partition sizes do produce 1, 3 and more-partitions-than-blocks plans."""
    plan = attention.plan_attention(6, 6, 4, 2, 64, 5, 16, torch.float16, False, None)
    assert plan.max_partitions == 1 and plan.workspace_numel == 0
    assert attention.plan_attention(6, 6, 4, 2, 64, 4, 16, torch.float16, False,
                                    17).max_partitions == 4  # 50 tokens -> 3 partitions
    plan = attention.plan_attention(6, 6, 4, 2, 64, 5, 16, torch.float16, False, 4)
    assert plan.max_partitions == 20 > 5  # more partitions than blocks
    assert plan.workspace_numel == attention.workspace_size(6, 4, 64, 5, 16, 4)


PACKED = cases({"dtype": [torch.float32, torch.bfloat16], "head_dim": [64, 80],
                "heads": [(4, 4), (14, 2), (8, 1)], "causal": [True, False],
                "feature": ["none", "softcap", "window", "alibi"]})


@pytest.mark.parametrize(*PACKED)
def test_packed(dtype, head_dim, heads, causal, feature):
    hq, hkv = heads
    q_lens = [1, 6, 0, 19]  # decode row, chunk over a cached prefix, empty, prefill
    kv_lens = [9, 6, 4, 19]
    k, v, table, seq_lens = make_cache(kv_lens, 8, hkv, head_dim, dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEV)
    query = torch.randn(sum(q_lens), hq, head_dim, dtype=dtype, device=DEV)
    kw = dict(features(feature, hq), causal=causal)
    out = run_triton(query, k, v, table, seq_lens, cu, **kw)
    check(out, query, k, v, table, seq_lens, cu, **kw)


@pytest.mark.parametrize("packed", [False, True])
def test_batch_invariance(packed):
    """A sequence's output is bitwise the same alone and among batchmates of other lengths."""
    lens = [70, 3, 33]
    k, v, table, seq_lens = make_cache(lens, 8, 2, 64, torch.bfloat16)
    q_lens = [3, 1, 2] if packed else [1, 1, 1]
    starts = torch.tensor([0] + q_lens).cumsum(0).tolist()
    query = torch.randn(starts[-1], 8, 64, dtype=torch.bfloat16, device=DEV)

    def cu(sel):
        n = [q_lens[b] for b in sel]
        return torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32,
                            device=DEV) if packed else None

    full = run_triton(query, k, v, table, seq_lens, cu([0, 1, 2]), partition_size=16)
    for b in range(3):
        alone = run_triton(query[starts[b]:starts[b + 1]], k, v, table[b:b + 1],
                           seq_lens[b:b + 1], cu([b]), partition_size=16)
        assert torch.equal(alone, full[starts[b]:starts[b + 1]])


def test_workspace_and_noncontiguous_query():
    lens = [40, 9]
    k, v, table, seq_lens = make_cache(lens, 8, 2, 96, torch.float16)
    qkv = torch.randn(2, 8 + 2 * 2, 96, dtype=torch.float16, device=DEV)
    query = qkv[:, :8]  # sliced from a fused qkv projection: heads not contiguous with tokens
    size = attention.workspace_size(2, 8, 96, table.shape[1], 8, partition_size=16)
    ws = torch.full((size,), float("nan"), device=DEV)
    out = run_triton(query, k, v, table, seq_lens, partition_size=16, workspace=ws)
    assert torch.equal(out, run_triton(query.contiguous(), k, v, table, seq_lens,
                                       partition_size=16))
    check(out, query, k, v, table, seq_lens)
    with pytest.raises(ValueError, match="workspace"):
        run_triton(query, k, v, table, seq_lens, partition_size=16, workspace=ws[:-1])


def test_int64_cache_offsets():
    """block id x block stride past 2**31 elements: a 4 GiB virtual cache of which only the
    used blocks are ever touched."""
    block_size, hkv, d = 16, 2, 64
    per_block = block_size * hkv * d
    num_blocks = 2**31 // per_block + 8
    try:
        k = torch.empty((num_blocks, block_size, hkv, d), dtype=torch.float16, device=DEV)
        v = torch.empty_like(k)
    except RuntimeError:
        pytest.skip("cannot reserve a 4 GiB cache here")
    blocks = [num_blocks - 1, num_blocks - 5, 3]
    lens = torch.tensor([40], dtype=torch.int32, device=DEV)
    table = torch.tensor([blocks], dtype=torch.int32, device=DEV)
    key = torch.randn(40, hkv, d, dtype=torch.float16, device=DEV)
    value = torch.randn_like(key)
    slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size
                          for i in range(40)], device=DEV)
    ops.append_kv(key, value, k, v, slots, backend="triton")
    assert torch.equal(k[blocks[0], :16], key[:16]) and torch.equal(v[blocks[2], :8], value[32:])
    query = torch.randn(1, 4, d, dtype=torch.float16, device=DEV)
    out = run_triton(query, k, v, table, lens, partition_size=16)
    small_k = torch.stack([k[b] for b in blocks]).cpu()
    small_v = torch.stack([v[b] for b in blocks]).cpu()
    small_table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    check(out, query, small_k, small_v, small_table, lens)


# ------------------------------------------------------------------------------------- sampling
# (BLOCK, RADIX_BLOCK, TARGET_PROGRAMS) of the split sampler: the shipped sizes (one split per
# row at these vocabularies), then small chunks so rows split into one-chunk and multi-chunk
# ranges with a partial last range.
SPLIT_LAYOUTS = [None, (64, 32, 512), (32, 16, 64)]


@pytest.fixture(params=SPLIT_LAYOUTS, ids=["shipped", "one-chunk-splits", "multi-chunk-splits"])
def split_layout(request, monkeypatch):
    if request.param is not None:
        for name, value in zip(("BLOCK", "RADIX_BLOCK", "TARGET_PROGRAMS"), request.param):
            monkeypatch.setattr(sampling, name, value)
    return request.param


def test_split_plan_covers_the_vocabulary():
    for batch in (1, 3, 64, 256, 1000):
        for vocab in (1, 1023, 1024, 1025, 32000, 128256, 256000):
            num_splits, chunks = sampling.split_plan(batch, vocab)
            assert 1 <= num_splits <= sampling.MAX_SPLITS
            # every token in exactly one split, no split empty
            assert (num_splits - 1) * chunks * sampling.BLOCK < vocab <= (
                num_splits * chunks * sampling.BLOCK)
    assert sampling.split_plan(1, 128256)[0] > 1 and sampling.split_plan(64, 128256)[0] > 1


def test_philox_uniform_bit_exact():
    seeds = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**62 - 1, 12345678901234] * 4, device=DEV)
    offsets = torch.tensor([0] * 6 + [1] * 6 + [2**32 + 5] * 6 + [2**40 + 3] * 6, device=DEV)
    got = sampling.philox_uniform(seeds, offsets)
    assert torch.equal(got.cpu(), torch_backend.philox_uniform(seeds.cpu(), offsets.cpu()))


def row_params(batch, vocab):
    """Per-row parameters covering every stage, greedy rows and disabled stages."""
    g = torch.Generator().manual_seed(1)
    pick = lambda values: torch.tensor(values)[torch.randint(len(values), (batch,), generator=g)]
    return dict(
        temperature=pick([0.0, 0.5, 1.0, 1.25]),  # exactly representable: exact comparisons
        top_k=pick([0, 1, 7, vocab]), top_p=pick([1.0, 0.75, 1e-6]), min_p=pick([0.0, 0.125]),
        repetition_penalty=pick([1.0, 1.25, 0.5]),
        seen_tokens=torch.randint(-1, vocab, (batch, 9), generator=g))


def make_logits(batch, vocab, dtype):
    logits = torch.randn(batch, vocab) * 3
    logits[1, 10:20] = logits[1].max()  # ties at the top (argmax, top-k, top-p boundaries)
    logits[2, :] = logits[2, 0]  # all equal
    return logits.to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_process_logits_matches_references(dtype, split_layout):
    batch, vocab = 24, 333
    if split_layout is not None:
        assert sampling.split_plan(batch, vocab)[0] > 1
    logits = make_logits(batch, vocab, dtype)
    params = row_params(batch, vocab)
    dev_params = {k: v.to(DEV) for k, v in params.items()}
    got = ops.process_logits(logits, backend="triton", **dev_params).cpu()
    same = ops.process_logits(logits.cpu(), backend="torch", **params)
    ref = reference.process_logits(logits.cpu(), **params)
    assert torch.equal(got.isfinite(), ref.isfinite()), "filtered set differs from HF's"
    assert torch.equal(got, same)  # same float32 math: temperature division, penalty


def torch_draw_margin(logits, params, seeds, offsets):
    """Distance of the torch backend's target from the nearest CDF boundary, per row
    (relative to the row total): rows closer than float32 rounding may legitimately differ."""
    p = normalize(logits, **params)
    scores = torch_backend.process_logits(logits, p)
    probs = (scores - scores.max(-1, keepdim=True).values).exp().double().nan_to_num(0.0)
    cdf = probs.cumsum(-1)
    target = torch_backend.philox_uniform(seeds, offsets).double() * cdf[:, -1]
    return ((cdf - target[:, None]).abs().min(-1).values / cdf[:, -1]).nan_to_num(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_draws_match_torch_backend(dtype, split_layout):
    batch, vocab = 48, 257
    logits = make_logits(batch, vocab, dtype)
    params = row_params(batch, vocab)
    seeds = torch.randint(0, 2**62, (batch,))
    offsets = torch.randint(0, 2**40, (batch,))
    got = ops.sample(logits, backend="triton", seeds=seeds.to(DEV), offsets=offsets.to(DEV),
                     **{k: v.to(DEV) for k, v in params.items()}).cpu()
    want = ops.sample(logits.cpu(), backend="torch", seeds=seeds, offsets=offsets, **params)
    differ = got != want
    margin = torch_draw_margin(logits.cpu(), params, seeds, offsets)
    assert (margin[differ] < 1e-5).all(), f"rows {differ.nonzero().flatten().tolist()} differ"
    assert differ.sum() <= 1
    # A seeded row's draw does not depend on its batchmates or its position.
    for b in (0, 5):
        alone = ops.sample(logits[b:b + 1], backend="triton", seeds=seeds[b:b + 1].to(DEV),
                           offsets=offsets[b:b + 1].to(DEV),
                           **{k: v[b:b + 1].to(DEV) for k, v in params.items()})
        assert alone.item() == got[b].item()


def test_bad_rows_and_greedy_ties(split_layout):
    vocab = 40
    logits = torch.randn(8, vocab)
    logits[0, 3] = float("nan")  # NaN, sampled row
    logits[1, 7] = float("nan")  # NaN, greedy row
    logits[2] = -INF  # nothing finite
    logits[3, 11] = INF  # +inf on a sampled row
    logits[4, [5, 9]] = INF  # +inf on a greedy row: first +inf wins
    logits[5, [6, 30]] = 50.0  # greedy tie: first index
    logits[6] = -INF
    logits[6, 21] = 0.0  # a single finite logit
    logits[7, [2, 33]] = 50.0  # top_p -> 0 keeps the argmax (both ties)
    temperature = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.7, 1.0])
    kw = dict(temperature=temperature.to(DEV), top_p=torch.tensor(
        [1.0] * 7 + [1e-7]).to(DEV), seeds=torch.arange(8, device=DEV))
    got = ops.sample(logits.to(DEV), backend="triton", **kw).cpu()
    assert got[:7].tolist() == [-1, -1, -1, -1, 5, 6, 21]
    assert got[7].item() in (2, 33)
    scores = ops.process_logits(logits[7:].to(DEV), top_p=1e-7, backend="triton").cpu()
    assert scores[0].isfinite().nonzero().flatten().tolist() == [2, 33]


def test_repetition_penalty_once_per_id():
    logits = torch.tensor([[2.0, -2.0, 3.0, 0.5, -1.0]], device=DEV).to(torch.bfloat16)
    seen = torch.tensor([[0, 1, 0, -1, 1, 0]], device=DEV)
    got = ops.apply_repetition_penalty(logits, seen, 2.0, backend="triton").cpu()
    assert got.dtype == torch.float32
    assert got.tolist() == [[1.0, -4.0, 3.0, 0.5, -1.0]]


# ------------------------------------------------------------------------------- custom ops
def test_custom_ops_opcheck():
    k, v, table, seq_lens = make_cache([20, 3], 8, 2, 64, torch.float32)
    query = torch.randn(2, 4, 64, device=DEV)
    out = torch.empty_like(query)
    ws = torch.empty(attention.workspace_size(2, 4, 64, table.shape[1], 8, 8), device=DEV)
    fd = torch.ops.fastdecode
    torch.library.opcheck(fd.triton_paged_attention, (out, query, k, v, table, seq_lens, None,
                                                      None, ws, 0.125, True, 0.0, 0, 8))
    key = torch.randn(3, 2, 64, device=DEV)
    slots = torch.tensor([1, -1, 17], device=DEV)
    torch.library.opcheck(fd.triton_append_kv, (key, key.clone(), k, v, slots))
    logits = torch.randn(3, 50, device=DEV)
    p = normalize(logits, temperature=0.5, top_k=5, repetition_penalty=1.5,
                  seen_tokens=torch.tensor([[1, 2], [3, -1], [4, 4]], device=DEV))
    args = (logits, p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
            p.seen_tokens)
    torch.library.opcheck(fd.triton_process_logits, args)
    seeds = torch.arange(3, device=DEV)
    torch.library.opcheck(fd.triton_sample, args + (seeds, seeds))
    torch.library.opcheck(fd.triton_apply_repetition_penalty,
                          (logits, p.seen_tokens, p.repetition_penalty))
