"""Helpers shared by the HF-integration tests (tests/test_generate*.py, tests/test_hf_*.py).

``FASTDECODE_TEST_BACKEND`` picks the ops backend the tests run fastdecode with (default "auto";
"torch" runs everything on the plain-PyTorch reference ops).
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch
import transformers

import fastdecode
from fastdecode.models.cpp_loop import CppLoop
from fastdecode.plan import PagedKVCache

BACKEND = os.environ.get("FASTDECODE_TEST_BACKEND", "auto")
NEAR_TIE = 1e-5


def fd_generate(model, *args, **kwargs):
    return fastdecode.generate(model, *args, backend=BACKEND, **kwargs)


def forbid_original_generate(monkeypatch):
    """Make fastdecode's fallback to the original ``model.generate`` fail the test."""
    def forbidden(model):
        raise AssertionError("the original model.generate must not run")
    monkeypatch.setattr(importlib.import_module("fastdecode.hf.generate"), "original_generate",
                        forbidden)


def padded_batch(lengths, vocab: int, seed: int = 0, pad: int = 0):
    """Left-padded ``(input_ids [B, L], attention_mask [B, L])`` of random ids in [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def assert_greedy_match(hf_out, ours: torch.Tensor, prompt_len: int, tie: float = NEAR_TIE,
                        relative: bool = False):
    """``ours`` equals HF's greedy sequences, except after a step where HF's top-2 processed
    scores were within ``tie`` (absolute, or relative to the top score): a legitimate near-tie.

    hf_out: HF's GenerateDecoderOnlyOutput with ``scores``. Returns the number of rows that
    diverged at a near-tie.
    """
    ref = hf_out.sequences
    assert ours.shape[0] == ref.shape[0], (ours.shape, ref.shape)
    ties = 0
    for row in range(ref.shape[0]):
        width = min(ref.shape[1], ours.shape[1])
        diff = (ref[row, :width] != ours[row, :width]).nonzero()
        if len(diff) == 0:
            assert ours.shape[1] == ref.shape[1], f"row {row}: lengths {ours.shape} vs {ref.shape}"
            continue
        step = int(diff[0]) - prompt_len
        assert step >= 0, f"row {row}: prompt differs"
        top2 = hf_out.scores[step][row].topk(2).values
        gap = float(top2[0] - top2[1])
        limit = tie * max(1.0, abs(float(top2[0]))) if relative else tie
        assert gap <= limit, (f"row {row} diverges at new token {step} where HF's top-2 gap is "
                              f"{gap:.3g} (> {limit:.3g}): {ours[row]} vs {ref[row]}")
        ties += 1
    return ties


@contextlib.contextmanager
def count_paged_calls(monkeypatch):
    """Count layer calls of the paged KV cache (each appends and attends: ``append_kv`` and
    ``paged_attention``, in Python or in the native step's C++ layer loop) and DynamicCache
    constructions."""
    counts = {"append_kv": 0, "paged_attention": 0, "dynamic_cache": 0}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    attend = wrap("append_kv", wrap("paged_attention", PagedKVCache.attend))
    monkeypatch.setattr(PagedKVCache, "attend", attend)
    run_loop = CppLoop.__call__

    def loop(self, *args, **kwargs):  # the C++ layer loop appends and attends once per layer
        counts["append_kv"] += len(self.windows)
        counts["paged_attention"] += len(self.windows)
        return run_loop(self, *args, **kwargs)

    monkeypatch.setattr(CppLoop, "__call__", loop)
    init = transformers.DynamicCache.__init__
    monkeypatch.setattr(transformers.DynamicCache, "__init__",
                        wrap("dynamic_cache", init))
    yield counts


class RecordingStreamer:
    """Records every put/end call (the BaseStreamer protocol) as host tensors."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.detach().cpu().clone()))

    def end(self):
        self.calls.append(("end", None))
