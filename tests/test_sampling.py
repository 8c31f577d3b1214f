"""process_logits, apply_repetition_penalty and the deterministic properties of sample, on every
backend, against the float64 reference (tests/reference.py). The filter properties (top-k ties,
tiny top-p, full min-p, greedy rows among sampled ones, penalties) are checked through ``sample``
on every backend, and through ``process_logits`` where the backend implements it."""

from __future__ import annotations

import math

import pytest
import torch

import reference
from fastdecode import ops
from pairwise import cases
from sampling_cases import (EXACT_BOUNDARIES, assert_processed_matches, per_row,
                            random_logits, seen_tokens)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF = -math.inf

SPACE = {
    "vocab": [1, 7, 1000, 50257],
    "batch": [1, 3, 17],
    "dtype": DTYPES,
    "temperature": [0.0, 0.6, 1.0, 1.7, "mixed"],
    "top_k": [0, 1, 5, 50, "mixed"],
    "top_p": [1.0, 0.9, 0.5, 1e-6, "mixed"],
    "min_p": [0.0, 0.05, 0.5, "mixed"],
    "penalty": [1.0, 1.3, 0.7, "mixed"],
}
MIXED = {"temperature": [0.0, 0.8, 1.3], "top_k": [0, 3, 40], "top_p": [1.0, 0.7, 0.95],
         "min_p": [0.0, 0.1], "penalty": [1.0, 1.5, 0.8]}
DT = {"temperature": torch.float32, "top_k": torch.int64, "top_p": torch.float32,
      "min_p": torch.float32, "penalty": torch.float32}


def _shrink(backend, vocab: int) -> int:
    return min(vocab, 1000) if backend.interpreted else vocab


def drawn_set(backend, logits: torch.Tensor, draws: int = 128, **params) -> set[int]:
    """Token ids drawn from the single row ``logits`` [1, V] with ``draws`` different seeds."""
    rows = logits.repeat(draws, 1).to(backend.device)
    seeds = torch.arange(draws, device=backend.device) * 7919 + 1
    ids = ops.sample(rows, seeds=seeds, backend=backend.name, **params).cpu()
    return set(ids.tolist())


@pytest.mark.ops("process_logits")
@pytest.mark.parametrize(*cases(SPACE))
def test_process_logits_matches_reference(backend, vocab, batch, dtype, temperature, top_k,
                                          top_p, min_p, penalty):
    vocab = _shrink(backend, vocab)
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 repetition_penalty=penalty)
    params = {}
    for (name, value), key in zip(given.items(), MIXED):
        params[name] = per_row(MIXED[key], batch, DT[key]) if value == "mixed" else value
    logits = random_logits(batch, vocab, dtype)
    seen = seen_tokens(batch, vocab, 9)
    dev = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
           for k, v in params.items()}
    out = ops.process_logits(logits.to(backend.device), seen_tokens=seen.to(backend.device),
                             backend=backend.name, **dev)
    assert_processed_matches(out.cpu(), logits, seen_tokens=seen, **params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_keeps_every_tie_at_the_boundary(backend, dtype):
    row = torch.tensor([0.5, 2.0, 1.0, 2.0, 3.0, 2.0, -1.0, 2.0])
    logits = torch.stack([row, row.flip(0), torch.full((8,), 1.5)]).to(dtype)
    expected = [x >= 2.0 for x in row.tolist()]  # 3 and all four 2s
    for k in (2, 3, 5):
        if not backend.covers("process_logits"):  # the kept set, seen through many draws
            want = {i for i, keep in enumerate(expected) if keep}
            assert drawn_set(backend, logits[:1], top_k=k) == want, k
            assert drawn_set(backend, logits[1:2], top_k=k) == {7 - i for i in want}, k
            assert drawn_set(backend, logits[2:], top_k=k) == set(range(8)), k  # all tied
            continue
        out = ops.process_logits(logits.to(backend.device), top_k=k, backend=backend.name).cpu()
        kept = out > NEG_INF
        assert kept[0].tolist() == expected, k
        assert kept[1].tolist() == kept[0].flip(0).tolist()
        assert kept[2].all()  # all tied: all kept
        assert_processed_matches(out, logits, top_k=k)


def test_top_k_ties_larger_than_the_candidate_buffer(backend):
    vocab = _shrink(backend, 50257)
    logits = torch.randn(2, vocab) - 10.0
    logits[0, ::3] = 1.0  # a third of the vocabulary tied at the top, k = 5
    logits[1, -5:] = 2.0
    if not backend.covers("process_logits"):  # the kept set, seen through many draws
        tied = set(torch.nonzero(logits[0] == 1.0)[:, 0].tolist())
        drawn = drawn_set(backend, logits[:1], top_k=5)
        assert drawn <= tied and len(drawn) > 5, "every tie is kept, nothing else"
        assert drawn_set(backend, logits[1:], top_k=5) == set(range(vocab - 5, vocab))
        return
    out = ops.process_logits(logits.to(backend.device), top_k=5, backend=backend.name).cpu()
    assert torch.equal(out[0] > NEG_INF, logits[0] == 1.0)
    assert torch.equal(out[1] > NEG_INF, logits[1] == 2.0)


@pytest.mark.parametrize("vocab", [7, 1000, 50257])
def test_tiny_top_p_and_full_min_p_keep_the_argmax(backend, vocab):
    vocab = _shrink(backend, vocab)
    logits = random_logits(5, vocab, torch.float32, scale=0.01)  # nearly flat
    logits[:, vocab // 2] = logits.max() + 1e-3
    for params in (dict(top_p=1e-9), dict(min_p=1.0), dict(top_k=1, top_p=1e-9, min_p=1.0)):
        drawn = ops.sample(logits.to(backend.device), backend=backend.name, **params).cpu()
        assert (drawn == vocab // 2).all(), params
        if backend.covers("process_logits"):
            out = ops.process_logits(logits.to(backend.device), backend=backend.name,
                                     **params).cpu()
            assert ((out > NEG_INF).sum(-1) == 1).all(), params
            assert (out.argmax(-1) == vocab // 2).all(), params


def test_greedy_rows_mixed_with_sampled_rows(backend):
    batch, vocab = 6, _shrink(backend, 1000)
    logits = random_logits(batch, vocab, torch.float32)
    logits[:, 10] = logits[:, 20] = logits.max() + 1.0  # tied maximum: first index wins
    seen = seen_tokens(batch, vocab, 6)
    seen[1, 0] = 10  # row 1 penalises the first of the two maxima
    temperature = torch.tensor([0.0, 0.0, 0.7, 0.0, 1e-3, 2.0])
    params = dict(temperature=temperature, top_k=3, top_p=0.9, min_p=0.05,
                  repetition_penalty=1.4, seen_tokens=seen)
    dev = {k: v.to(backend.device) for k, v in params.items() if isinstance(v, torch.Tensor)}
    drawn = ops.sample(logits.to(backend.device), backend=backend.name, **{**params, **dev}).cpu()
    processed = reference.process_logits(logits, **params)
    assert drawn[0] == 10 and drawn[1] == 20 and drawn[3] == processed[3].argmax()
    assert ((drawn >= 0) & (drawn < vocab)).all()
    assert (processed[torch.arange(batch), drawn] > NEG_INF).all(), "drew a filtered token"
    if backend.covers("process_logits"):
        out = ops.process_logits(logits.to(backend.device), backend=backend.name,
                                 **{**params, **dev}).cpu()
        assert_processed_matches(out, logits, **params)


@pytest.mark.ops("apply_repetition_penalty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("penalty", [1.5, 0.6])
def test_repetition_penalty_alone(backend, dtype, penalty):
    batch, vocab = 4, _shrink(backend, 1003)
    logits = random_logits(batch, vocab, dtype)
    logits[:, :4] = torch.tensor([-2.0, 0.0, 2.0, -0.5]).to(dtype)
    seen = seen_tokens(batch, vocab, 12)
    seen[:, :3] = torch.tensor([0, 1, 2])  # negative, zero and positive logits
    seen[:, 3:6] = torch.tensor([2, 2, -1])  # duplicates and padding: penalised once
    seen[3] = -1  # a row with nothing seen
    pen = torch.tensor([penalty, penalty, 1.0, penalty])
    before = logits.clone()
    out = ops.apply_repetition_penalty(logits.to(backend.device), seen.to(backend.device),
                                       pen.to(backend.device), backend=backend.name).cpu()
    ref = reference.process_logits(logits, temperature=0.0, repetition_penalty=pen,
                                   seen_tokens=seen)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=0)
    assert out[0, 2] == pytest.approx(2.0 / penalty) and out[0, 0] == pytest.approx(-2 * penalty)
    assert torch.equal(logits, before)  # inputs untouched


def test_logits_are_never_modified(backend):
    logits = random_logits(3, 50, torch.float32).to(backend.device)
    before = logits.clone()
    kwargs = dict(top_k=5, top_p=0.8, repetition_penalty=1.3,
                  seen_tokens=torch.tensor([[1, 2], [3, -1], [4, 4]], device=backend.device))
    ops.sample(logits, backend=backend.name, **kwargs)
    if backend.covers("process_logits"):
        ops.process_logits(logits, backend=backend.name, **kwargs)
    assert torch.equal(logits, before)


def test_seeded_rows_ignore_batch_position_and_batchmates(backend):
    vocab = _shrink(backend, 50257)
    target = random_logits(1, vocab, torch.float32, scale=1.0)
    others = random_logits(6, vocab, torch.float32, scale=1.0)
    params = dict(temperature=0.9, top_k=0, top_p=0.95)
    tokens = set()
    for pos, mates in ((0, 1), (3, 6), (5, 5)):
        rows = list(others[:mates])
        rows.insert(pos, target[0])
        seeds = torch.randint(0, 2**40, (len(rows),))
        offsets = torch.randint(0, 100, (len(rows),))
        seeds[pos], offsets[pos] = 1234, 77
        logits = torch.stack(rows).to(backend.device)
        drawn = ops.sample(logits, seeds=seeds.to(backend.device),
                           offsets=offsets.to(backend.device), backend=backend.name, **params)
        tokens.add(int(drawn[pos]))
    assert len(tokens) == 1
    # A different offset is a different draw stream (not a constant).
    seed = torch.tensor([1234], device=backend.device)
    drawn = {int(ops.sample(target.to(backend.device), seeds=seed, offsets=seed * 0 + o,
                            backend=backend.name, **params)) for o in range(8)}
    assert len(drawn) > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 50257])
def test_seeded_draws_match_the_torch_backend(backend, vocab, dtype):
    if backend.name == "torch":
        pytest.skip("compares a backend with the torch backend")
    vocab, batch = _shrink(backend, vocab), 64
    logits = random_logits(batch, vocab, dtype, scale=2.0)
    # Low-precision logits tie often; the torch backend breaks ties inside top-p like HF's sort,
    # while the kernels keep them (documented), so top-p is compared on float32 only.
    params = dict(temperature=per_row([0.0, 0.7, 1.0, 1.5], batch, torch.float32),
                  top_k=per_row([0, 50], batch, torch.int64),
                  top_p=0.95 if dtype == torch.float32 else 1.0)
    seeds, offsets = torch.arange(batch) * 7919, torch.arange(batch) % 5
    want = ops.sample(logits, seeds=seeds, offsets=offsets, backend="torch", **params)
    dev = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
           for k, v in params.items()}
    got = ops.sample(logits.to(backend.device), seeds=seeds.to(backend.device),
                     offsets=offsets.to(backend.device), backend=backend.name, **dev).cpu()
    # Equal up to float-rounding boundaries of the CDF, which random data essentially never hits.
    assert (got == want).float().mean() >= 0.98


def test_nan_and_non_finite_rows(backend):
    vocab = _shrink(backend, 1000)
    logits = random_logits(8, vocab, torch.float32)
    logits[0, 17] = math.nan
    logits[1] = NEG_INF
    logits[2, -1] = math.nan  # in the last, partial chunk
    logits[3, 5] = math.inf
    logits[4, :-1] = NEG_INF  # one finite token left
    logits[5, 3] = math.inf
    logits[7, -1] = math.nan  # in the last, partial chunk of a sampled (top-k) row
    temperature = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.8, 0.0, 1.0, 1.0])
    params = dict(temperature=temperature.to(backend.device), top_k=10, top_p=0.9)
    drawn = ops.sample(logits.to(backend.device), backend=backend.name, **params).cpu()
    assert drawn[:4].tolist() == [-1, -1, -1, -1]  # NaN, all -inf, NaN (greedy), +inf (sampled)
    assert drawn[4] == vocab - 1 and drawn[5] == 3  # greedy +inf row: its argmax
    assert 0 <= drawn[6] < vocab and drawn[7] == -1
    if backend.covers("process_logits"):  # no crash
        ops.process_logits(logits.to(backend.device), backend=backend.name, **params)


@pytest.mark.parametrize("name,value,message", [
    ("temperature", torch.tensor([1.0, -0.5, 1.0]), r"temperature must be >= 0.*row 1"),
    ("temperature", math.inf, r"temperature"),
    ("top_p", torch.tensor([0.5, 1.0, 0.0]), r"top_p must be in \(0, 1\].*row 2"),
    ("top_p", 1.5, r"top_p"),
    ("min_p", torch.tensor([-0.1, 0.0, 0.0]), r"min_p must be in \[0, 1\].*row 0"),
    ("min_p", 2.0, r"min_p"),
    ("repetition_penalty", torch.tensor([1.0, 0.0, 1.0]), r"repetition_penalty must be > 0.*row 1"),
    ("top_k", torch.tensor([1.0, 2.5, 3.0]), r"top_k must be an integer.*row 1"),
    ("top_k", 2.5, r"top_k"),
    ("seen_tokens", torch.tensor([[1, 2], [3, 50], [-1, -1]]), r"seen_tokens.*row 1"),
])
def test_invalid_parameters_name_the_parameter_and_row(name, value, message):
    logits = torch.randn(3, 50)
    for op in (ops.sample, ops.process_logits):
        with pytest.raises(ValueError, match=message):
            op(logits, **{name: value})



@pytest.mark.parametrize("probs, top_p", EXACT_BOUNDARIES)
def test_top_p_exact_boundary_matches_hf(backend, probs, top_p):
    from transformers import TopPLogitsWarper

    logits = torch.tensor([probs]).log()
    hf_kept = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), logits) > NEG_INF
    rows = logits.repeat(64, 1).to(backend.device)
    seeds = torch.arange(64, device=backend.device) * 101
    drawn = ops.sample(rows, top_p=top_p, seeds=seeds, backend=backend.name).cpu()
    assert hf_kept[0, drawn].all(), "drew a token transformers filters"
    assert set(drawn.tolist()) == set(hf_kept[0].nonzero()[:, 0].tolist())
    if backend.covers("process_logits"):
        out = ops.process_logits(logits.to(backend.device), top_p=top_p, backend=backend.name)
        assert torch.equal(out.cpu() > NEG_INF, hf_kept)
