"""The CUDA kernels of csrc/kernels, run on the CPU under tests/cuda_emu (a coroutine model of
CTAs, barriers and warp collectives), against the float64 references and the torch backend.

This is how CI, which has no GPU, checks the CUDA kernels' indexing, masking, split-KV merge and
selection logic; timing and hardware concurrency are checked only by the GPU tests.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from cuda_emu import runner
from cuda_emu.runner import PARTITION
from fastdecode.ops import torch_backend
from fastdecode.ops._params import normalize
import guard_cases
import reference
from pairwise import pairwise
from sampling_cases import EXACT_BOUNDARIES


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = runner.build(tmp_path_factory.mktemp("cuda_emu"))
    if so is None:
        pytest.skip("g++ not found")
    return so


# ------------------------------------------------------------------------------------ append_kv
@pytest.mark.parametrize("dtype, d, strided", [(torch.float16, 80, True),
                                               (torch.bfloat16, 64, False),
                                               (torch.float32, 36, True),
                                               (torch.float16, 5, False)])
def test_append_kv(lib, dtype, d, strided):
    n, p, hkv, t = 6, 5, 3, 11
    k_cache = torch.randn(n, p, hkv, d).to(dtype)
    v_cache = torch.randn(n, p, hkv, d).to(dtype)
    big = torch.randn(t, hkv + 2, d + 3).to(dtype)
    key = big[:, 1:hkv + 1, :d] if strided else torch.randn(t, hkv, d).to(dtype)
    value = (key * 3).contiguous()
    slots = torch.randperm(n * p)[:t]
    slots[[2, 7]] = -1
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    torch_backend.append_kv(key, value, expect_k, expect_v, slots)
    runner.append_kv(lib, key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


# ----------------------------------------------------------------------------- paged attention
def _run_decode(lib, *args, **kwargs):
    return runner.paged_decode(lib, *args, **kwargs)


DECODE_CASES = pairwise({
    "dtype": [torch.float16, torch.bfloat16, torch.float32],
    "d": [64, 80, 96, 128, 256],
    "heads": [(4, 4), (8, 2), (7, 1), (18, 2)],  # GQA 1, 4, 7 (MQA), 9 (two head chunks)
    "p": [1, 16, 7],
    "feature": ["plain", "softcap", "window", "alibi"],
})


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_paged_decode(lib, case):
    dtype, d, (hq, hkv), p = case["dtype"], case["d"], case["heads"], case["p"]
    # 0 (zeros), 1, ragged, exactly one partition, one partition + 1 (split-KV merge)
    lens = [0, 1, 37, PARTITION, PARTITION + 1 + p]
    m = max(math.ceil(n / p) for n in lens) + 1
    n_blocks = len(lens) * m + 2
    k_cache = torch.randn(n_blocks, p, hkv, d).to(dtype)
    v_cache = torch.randn(n_blocks, p, hkv, d).to(dtype)
    block_tables = torch.randperm(n_blocks)[: len(lens) * m].view(len(lens), m).int()
    query = torch.randn(len(lens), hq * 2, d).to(dtype)[:, ::2]  # strided heads
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    kw = {"softcap": 20.0} if case["feature"] == "softcap" else {}
    if case["feature"] == "window":
        kw = {"sliding_window": 30}
    alibi = torch.rand(hq) * 0.2 if case["feature"] == "alibi" else None
    scale = d ** -0.5
    out = _run_decode(lib, query, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                      softcap=kw.get("softcap", 0.0), window=kw.get("sliding_window", 0),
                      alibi=alibi)
    ref64 = reference.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                      scale=scale, alibi_slopes=alibi, **kw)
    ref_lowp = reference.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                         scale=scale, alibi_slopes=alibi, upcast=False, **kw)
    assert not out.isnan().any(), "every output element must be written"
    assert (out[0] == 0).all()
    reference.assert_close_2x(out, ref64, ref_lowp, atol=1e-3 if dtype == torch.float32 else 2e-3)


def test_softcap_is_accurate_under_fast_math(lib):
    """Softcapped fp32 logits in tanh's curved range, checked with the shared tests' tight bound.
    The emulator models --use_fast_math (tanhf as MUFU.TANH, expf / logf as their intrinsics), so
    a kernel calling tanhf fails here as it would on the GPU."""
    assert lib.emu_models_fast_math() == 1
    lens, p, hq, hkv, d = [PARTITION + 40, 97], 16, 8, 2, 128
    m = max(math.ceil(n / p) for n in lens)
    k_cache = torch.randn(len(lens) * m, p, hkv, d)
    v_cache = torch.randn(len(lens) * m, p, hkv, d)
    block_tables = torch.randperm(len(lens) * m).view(len(lens), m).int()
    query = torch.randn(len(lens), hq, d) * 3.0  # logits of several softcaps
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = _run_decode(lib, query, k_cache, v_cache, block_tables, seq_lens, scale=d ** -0.5,
                      softcap=2.0)
    kw = dict(scale=d ** -0.5, softcap=2.0)
    ref64 = reference.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, **kw)
    ref32 = reference.paged_attention(query, k_cache, v_cache, block_tables, seq_lens,
                                      upcast=False, **kw)
    reference.assert_close_2x(out, ref64, ref32, atol=1e-5)


def test_fast_math_model_and_accurate_tanh(lib):
    lib.emu_fast_math_tanhf.restype = lib.emu_accurate_tanh.restype = ctypes.c_float
    lib.emu_fast_math_tanhf.argtypes = lib.emu_accurate_tanh.argtypes = [ctypes.c_float]
    xs = torch.linspace(-12.0, 12.0, 4001).tolist() + [1e-30, -3e-8, 0.6249, 0.625, 40.0]
    def worst(fn):
        return max(abs(fn(x) - math.tanh(x)) / abs(math.tanh(x)) for x in xs if x != 0.0)
    assert worst(lib.emu_fast_math_tanhf) > 2.0 ** -11.5  # the modelled MUFU.TANH error
    assert worst(lib.emu_accurate_tanh) < 2.0 ** -21  # accurate_tanh under the same model
    assert math.isnan(lib.emu_accurate_tanh(math.nan))


def test_paged_decode_batch_invariant(lib):
    lens = [PARTITION * 2 + 5, 3, 100]
    p, hq, hkv, d = 16, 8, 2, 64
    k_cache = torch.randn(130, p, hkv, d).half()
    v_cache = torch.randn(130, p, hkv, d).half()
    block_tables = torch.randperm(130)[:3 * 40].view(3, 40).int()  # 40 > 33 blocks needed
    query = torch.randn(3, hq, d).half()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    together = _run_decode(lib, query, k_cache, v_cache, block_tables, seq_lens, scale=0.125)
    alone = _run_decode(lib, query[:1], k_cache, v_cache, block_tables[:1, :33].contiguous(),
                        seq_lens[:1], scale=0.125)
    assert torch.equal(alone[0], together[0])


# ------------------------------------------------------------------------------------ sampling
def _run_sample(lib, logits, params, seeds, offsets, num_sms=4):
    return runner.sample(lib, logits, params, seeds, offsets, num_sms)


SAMPLE_CASES = pairwise({
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "vocab": [1, 7, 1000, 4099],
    "top_k": [0, 1, 5],
    "top_p": [1.0, 0.9, 1e-6],
    "min_p": [0.0, 0.2],
})


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_sample_matches_torch_backend(lib, case):
    b, v = 6, case["vocab"]
    logits = (torch.randn(b, v) * 4).to(case["dtype"])
    logits[1, : v // 2] = logits[1, 0]  # ties at the top-k / top-p boundaries
    params = normalize(logits, temperature=torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 2.0]),
                       top_k=case["top_k"], top_p=case["top_p"], min_p=case["min_p"],
                       repetition_penalty=1.4,
                       seen_tokens=torch.randint(-1, v, (b, 5)))
    seeds = torch.tensor([3, 1, 4, 1, 5, 9]) * 1_000_003
    offsets = torch.arange(b) + 17
    before = logits.clone()
    ids = _run_sample(lib, logits, params, seeds, offsets)
    assert torch.equal(logits, before), "sample must not modify the logits"
    expected = torch_backend.sample(logits, params, seeds, offsets)
    processed = torch_backend.process_logits(logits, params)
    for row in range(b):
        assert 0 <= ids[row] < v and processed[row, ids[row]] > -math.inf
    # The same inverse-CDF rule: ids differ only if the uniform falls within float rounding of a
    # boundary, which these seeds do not hit.
    assert torch.equal(ids, expected)


def test_sample_does_not_depend_on_the_split_count(lib):
    """Several CTAs per row (slices, candidates, last-CTA merge) draw exactly what one CTA per
    row draws, on the candidate path (top-k), the whole-row path (no top-k; ties overflowing a
    slice's candidate buffer) and greedy rows, and what the torch backend draws."""
    b, v = 4, 9000
    logits = torch.randn(b, v) * 3
    logits[2, ::2] = 8.0  # 4500 tokens tied at the top: more than a slice's candidates
    params = normalize(logits, temperature=torch.tensor([0.8, 1.0, 0.9, 0.0]),
                       top_k=torch.tensor([40, 0, 5, 3]), top_p=0.9, min_p=0.01,
                       repetition_penalty=1.3, seen_tokens=torch.randint(-1, v, (b, 7)))
    seeds, offsets = torch.tensor([11, 12, 13, 14]), torch.tensor([5, 6, 7, 8])
    one = _run_sample(lib, logits, params, seeds, offsets, num_sms=1)
    assert lib.emu_sampling_num_splits(b, v, 64) == 3
    many = _run_sample(lib, logits, params, seeds, offsets, num_sms=64)
    assert torch.equal(one, many)
    assert torch.equal(many, torch_backend.sample(logits, params, seeds, offsets))


@pytest.mark.parametrize("probs, top_p", EXACT_BOUNDARIES)
def test_top_p_exact_boundary_matches_hf(lib, probs, top_p):
    from transformers import TopPLogitsWarper

    logits = torch.tensor([probs]).log()
    hf_kept = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), logits)[0] > -math.inf
    rows = logits.repeat(48, 1)
    params = normalize(rows, top_p=top_p)
    drawn = _run_sample(lib, rows, params, torch.arange(48) * 101,
                        torch.zeros(48, dtype=torch.int64))
    assert set(drawn.tolist()) == set(hf_kept.nonzero()[:, 0].tolist())


def test_sample_special_rows(lib):
    v = 300
    logits = torch.randn(5, v)
    logits[0, 17] = float("nan")
    logits[1] = float("-inf")
    logits[2, 5] = float("inf")   # sampled row with +inf -> -1
    logits[3, 9] = float("inf")   # greedy row with +inf -> that index
    logits[4, :] = 1.0            # greedy tie -> first index
    params = normalize(logits, temperature=torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    ids = _run_sample(lib, logits, params, torch.arange(5), torch.zeros(5, dtype=torch.int64))
    assert ids.tolist() == [-1, -1, -1, 9, 0]


def test_sample_distribution(lib):
    # Many seeds on one small row: empirical frequencies match the processed distribution.
    # (Each row is a 1024-thread CTA under the emulator, hence a modest number of draws.)
    v, draws = 12, 512
    logits = torch.randn(1, v).repeat(draws, 1)
    params = normalize(logits, temperature=0.8, top_k=8, top_p=0.95, min_p=0.02,
                       repetition_penalty=1.5, seen_tokens=torch.tensor([[2, 2, -1]] * draws))
    ids = _run_sample(lib, logits, params, torch.arange(draws) * 7 + 1,
                      torch.zeros(draws, dtype=torch.int64))
    probs = reference.distribution(logits[:1], temperature=0.8, top_k=8, top_p=0.95,
                                   min_p=0.02, repetition_penalty=1.5,
                                   seen_tokens=torch.tensor([[2, 2, -1]]))[0]
    freq = torch.bincount(ids, minlength=v).double() / draws
    assert (freq[probs == 0] == 0).all(), "filtered tokens never drawn"
    assert (freq - probs).abs().sum() / 2 < 0.1  # total variation; ~0.04 expected noise


# ------------------------------------------------------------------------- device-side guards
LONG = PARTITION + 44  # two partitions: a bad id in the second reaches the row through the merge


@pytest.mark.parametrize("poison", guard_cases.decode_poisons(LONG), ids=lambda p: p.name)
def test_decode_guards(lib, poison):
    """Poisoned block ids / seq_lens flag their rows with NaN, read nothing outside the pools and
    leave the other rows bit-identical (tests/guard_cases.py)."""
    case = guard_cases.decode_case(LONG, dtype=torch.float16)
    def run(c, out):
        runner.paged_decode(lib, c.query, c.k_cache, c.v_cache, c.block_tables, c.seq_lens,
                            scale=0.125, out=out)
    guard_cases.run_isolated(lambda: guard_cases.check_decode_guard(run, case, poison),
                             torch.device("cpu"))


def test_append_kv_guards(lib):
    run = lambda *args: runner.append_kv(lib, *args)  # noqa: E731
    guard_cases.run_isolated(lambda: guard_cases.check_append_guard(run, torch.device("cpu")),
                             torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 300, 5000])
def test_contrastive_matches_reference(lib, dtype, vocab):
    """Under the fast-math model; rows with NaN, +inf, nothing finite, a -inf amateur token, and
    per-row alpha / plausibility including 0 and 1."""
    g = torch.Generator().manual_seed(vocab)
    expert = (3 * torch.randn(8, vocab, generator=g)).to(dtype)
    amateur = (3 * torch.randn(8, vocab, generator=g)).to(dtype)
    expert[0, -1] = math.nan
    amateur[1, 0] = math.inf
    expert[2] = -math.inf
    amateur[3, int(expert[3].float().argmax())] = -math.inf
    alpha = torch.tensor([0.5, 1.0, 0.1, 2.0, 0.0, 1.0, 7.5, 0.3])
    plausibility = torch.tensor([0.1, 0.0, 1.0, 0.2, 0.0, 1.0, 0.05, 0.5])
    got = runner.contrastive(lib, expert, amateur, alpha, plausibility)
    ref64 = reference.contrastive_logits(expert, amateur, alpha, plausibility)
    ref32 = reference.contrastive_logits(expert, amateur, alpha, plausibility, torch.float32)
    assert torch.equal(got.isnan(), ref64.isnan())
    assert torch.equal(got == -math.inf, ref64 == -math.inf)
    assert torch.equal(got == math.inf, ref64 == math.inf)
    # Fast math's logf / expf error reaches each log-probability, the amateur's times alpha:
    # the error is compared per unit of (1 + alpha).
    weight = (1 + alpha)[:, None].expand_as(got)
    finite = ref64.isfinite()
    reference.assert_close_2x(got[finite] / weight[finite], ref64[finite] / weight[finite],
                              ref32[finite] / weight[finite], atol=5e-6)

