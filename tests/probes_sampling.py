"""Reliability probes of the sampling ops' inputs (the parameter ranges have their own tests):
logits of every float dtype, odd shapes, tensors on another device, odd ids, NaN rows."""

from __future__ import annotations

import torch

import fastdecode.ops as ops
from probe_kit import Target, assert_close, probe, rejects

SAMPLING = "sampling inputs"
B, V = 3, 50


def logits(t: Target, dtype: torch.dtype = torch.float32, shape=(B, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return (3 * torch.randn(*shape, generator=g)).to(dtype).to(t.device)


def params(t: Target) -> dict:
    """Every stage on, seeded rows (so two calls draw the same tokens)."""
    dev = t.device
    return dict(temperature=0.7, top_k=10, top_p=0.9, min_p=0.01, repetition_penalty=1.3,
                seen_tokens=torch.tensor([[1, 2, -1], [3, 3, 4], [-1, -1, -1]], device=dev),
                seeds=torch.arange(B, device=dev) + 11, offsets=torch.arange(B, device=dev))


def without_draw(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k not in ("seeds", "offsets")}


@probe(SAMPLING)
def float64_logits_sample(t: Target) -> None:
    """Documented: any float dtype, processed in float32 (so float64 draws what float32 does)."""
    kw = params(t)
    got = ops.sample(logits(t, torch.float64), **kw, backend=t.backend)
    assert torch.equal(got, ops.sample(logits(t), **kw, backend=t.backend)), got


@probe(SAMPLING)
def float64_logits_process(t: Target) -> None:
    kw = without_draw(params(t))
    got = ops.process_logits(logits(t, torch.float64), **kw, backend=t.backend)
    assert got.dtype == torch.float32
    assert torch.equal(got, ops.process_logits(logits(t), **kw, backend=t.backend))
    pen = ops.apply_repetition_penalty(logits(t, torch.float64), kw["seen_tokens"], 1.3,
                                       backend=t.backend)
    assert torch.equal(pen, ops.apply_repetition_penalty(logits(t), kw["seen_tokens"], 1.3,
                                                         backend=t.backend))


@probe(SAMPLING, backends=("cpu",))
def float64_logits_auto(t: Target) -> None:
    """The issue's case: backend="auto" (the C++ extension on CPU tensors)."""
    kw = params(t)
    got = ops.sample(logits(t, torch.float64), **kw)
    assert torch.equal(got, ops.sample(logits(t), **kw, backend="torch")), got


@probe(SAMPLING)
def half_logits(t: Target) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        kw = without_draw(params(t))
        got = ops.process_logits(logits(t, dtype), **kw, backend=t.backend)
        want = ops.process_logits(logits(t, dtype).cpu(), **without_draw(params(Target(
            "torch", torch.device("cpu")))), backend="torch")
        assert_close(got.nan_to_num(-1e30), want.nan_to_num(-1e30), f"{dtype}", tol=1e-3)


@probe(SAMPLING)
def sample_empty_batch(t: Target) -> None:
    got = ops.sample(logits(t, shape=(0, V)), backend=t.backend)
    assert got.shape == (0,) and got.dtype == torch.int64
    assert ops.process_logits(logits(t, shape=(0, V)), backend=t.backend).shape == (0, V)


@probe(SAMPLING)
def nan_and_infinite_rows(t: Target) -> None:
    """Documented: -1 for a row with NaN logits or nothing finite left, no crash."""
    x = logits(t)
    x[0, 7] = float("nan")
    x[1] = float("-inf")
    got = ops.sample(x, temperature=torch.tensor([0.7, 0.7, 0.0], device=t.device),
                     backend=t.backend).tolist()
    assert got[:2] == [-1, -1] and 0 <= got[2] < V, got


@probe(SAMPLING)
def noncontiguous_logits(t: Target) -> None:
    x = logits(t, shape=(V, B)).t()
    kw = params(t)
    assert torch.equal(ops.sample(x, **kw, backend=t.backend),
                       ops.sample(x.contiguous(), **kw, backend=t.backend))


@probe(SAMPLING)
def negative_seen_ids_are_padding(t: Target) -> None:
    kw = without_draw(params(t))
    odd = kw["seen_tokens"].clone()
    odd[odd < 0] = -7
    got = ops.process_logits(logits(t), **{**kw, "seen_tokens": odd}, backend=t.backend)
    assert torch.equal(got, ops.process_logits(logits(t), **kw, backend=t.backend))


for name, call, exc, words in (
        ("logits_int", lambda t: ops.sample(logits(t).long(), backend=t.backend), TypeError,
         "logits"),
        ("logits_1d", lambda t: ops.sample(logits(t)[0], backend=t.backend), ValueError,
         "logits"),
        ("logits_3d", lambda t: ops.sample(logits(t)[None], backend=t.backend), ValueError,
         "logits"),
        ("vocab_zero", lambda t: ops.sample(logits(t, shape=(B, 0)), backend=t.backend),
         ValueError, "vocab_size"),
        ("logits_on_meta", lambda t: ops.sample(logits(t).to("meta"), backend=t.backend),
         ValueError, "CPU or CUDA"),
        ("seen_tokens_on_meta", lambda t: ops.sample(
            logits(t), repetition_penalty=1.2, seen_tokens=torch.zeros(B, 2, dtype=torch.long,
                                                                      device="meta"),
            backend=t.backend), ValueError, "seen_tokens is on meta"),
        ("seeds_on_meta", lambda t: ops.sample(
            logits(t), seeds=torch.zeros(B, dtype=torch.long, device="meta"), backend=t.backend),
         ValueError, "seeds is on meta"),
        ("temperature_on_meta", lambda t: ops.sample(
            logits(t), temperature=torch.ones(B, device="meta"), backend=t.backend), ValueError,
         "temperature is on meta"),
        ("seen_tokens_float", lambda t: ops.sample(
            logits(t), repetition_penalty=1.2, seen_tokens=torch.zeros(B, 2, device=t.device),
            backend=t.backend), TypeError, "seen_tokens"),
        ("seen_tokens_wide", lambda t: ops.sample(
            logits(t), repetition_penalty=1.2,
            seen_tokens=torch.full((B, 2), 2**40, device=t.device), backend=t.backend),
         ValueError, "seen_tokens"),
        ("seen_tokens_rows", lambda t: ops.sample(
            logits(t), repetition_penalty=1.2,
            seen_tokens=torch.zeros(B + 1, 2, dtype=torch.long, device=t.device),
            backend=t.backend), ValueError, "seen_tokens"),
        ("seeds_float", lambda t: ops.sample(
            logits(t), seeds=torch.zeros(B, device=t.device), backend=t.backend), ValueError,
         "seeds"),
        ("offsets_shape", lambda t: ops.sample(
            logits(t), seeds=torch.zeros(B, dtype=torch.long, device=t.device),
            offsets=torch.zeros(B + 1, dtype=torch.long, device=t.device), backend=t.backend),
         ValueError, "offsets")):
    rejects(name, SAMPLING, call, exc, words)
