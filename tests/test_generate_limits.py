"""Calls that used to fail where HF works, and the memory a huge ``max_new_tokens`` may cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import StoppingCriteria

from _hf_helpers import assert_greedy_match, fd_generate, forbid_original_generate, padded_batch
from fastdecode.plan import attention as kv_module
from tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _same_as_hf(model, monkeypatch, **kwargs):
    """fastdecode (never falling back) does what HF does: same tokens, or same exception type."""
    try:
        ref = model.generate(**kwargs)
    except Exception as exc:  # noqa: BLE001 (whatever HF raises, we must raise too)
        with pytest.raises(type(exc)):
            fd_generate(model, **kwargs)
        return None
    with monkeypatch.context() as patch:
        forbid_original_generate(patch)
        out = fd_generate(model, **kwargs)
    assert torch.equal(out, ref)
    return out


def test_eos_outside_the_vocabulary_with_min_new_tokens(llama, monkeypatch):
    ids, mask = padded_batch([6, 3], llama.config.vocab_size, seed=3)
    out = _same_as_hf(llama, monkeypatch, input_ids=ids, attention_mask=mask, do_sample=False,
                      eos_token_id=[2, 5000], min_new_tokens=4, max_new_tokens=8)
    assert out is not None


class _StopAfter(StoppingCriteria):
    """Returns a Python bool (allowed by HF: it ORs criteria into a tensor)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return input_ids.shape[1] >= self.length


def test_stopping_criterion_returning_a_python_bool(llama, monkeypatch):
    ids, mask = padded_batch([6, 3], llama.config.vocab_size, seed=4)
    out = _same_as_hf(llama, monkeypatch, input_ids=ids, attention_mask=mask, do_sample=False,
                      max_new_tokens=9, stopping_criteria=[_StopAfter(ids.shape[1] + 3)])
    assert out.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("max_new_tokens", [2.5, 0, -1, 1.0])
def test_odd_max_new_tokens_behave_as_in_hf(llama, monkeypatch, max_new_tokens):
    ids, mask = padded_batch([4, 2], llama.config.vocab_size, seed=5)
    _same_as_hf(llama, monkeypatch, input_ids=ids, attention_mask=mask, do_sample=False,
                max_new_tokens=max_new_tokens)


def test_kv_cache_grows_with_the_tokens(llama, monkeypatch):
    """A huge max_new_tokens reserves nothing up front; the growth keeps HF's tokens."""
    sizes = []
    allocate = kv_module.allocate_kv_cache

    def recording(num_blocks, *args, **kwargs):
        sizes.append(num_blocks)
        return allocate(num_blocks, *args, **kwargs)

    monkeypatch.setattr(kv_module, "allocate_kv_cache", recording)
    ids, mask = padded_batch([5, 2, 4], llama.config.vocab_size, seed=6)
    stop = [_StopAfter(ids.shape[1] + 3)]
    out = fd_generate(llama, ids, attention_mask=mask, do_sample=False, max_new_tokens=10**7,
                      stopping_criteria=stop)
    assert out.shape[1] == ids.shape[1] + 3
    assert max(sizes) <= 3 * 2  # 3 rows of <= 2 blocks of 16 tokens for 8 tokens each
    sizes.clear()
    new = 70  # crosses several doublings (2 -> 4 -> 6 blocks per row)
    ref = llama.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                         return_dict_in_generate=True, output_scores=True)
    out = fd_generate(llama, ids, attention_mask=mask, do_sample=False, max_new_tokens=new)
    assert_greedy_match(ref, out, ids.shape[1])
    assert len(sizes) > 1 * llama.config.num_hidden_layers  # it did grow


_PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    import torch
    from transformers import StoppingCriteria
    import fastdecode
    from tiny import tiny_model

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] >= 8

    model = tiny_model(sys.argv[1])
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for new in (3, 10**7):
        out = fastdecode.generate(model, ids, max_new_tokens=new, do_sample=False,
                                  stopping_criteria=[StopAfter()])
        if new == 3:
            before = peak()
    print(json.dumps({"growth_kib": peak() - before, "length": out.shape[1]}))
""")


@pytest.mark.parametrize("family", ["llama", "falcon"])  # the paged path and the model's cache
def test_huge_max_new_tokens_costs_no_memory_up_front(family):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # tests/ for tiny
    run = subprocess.run([sys.executable, "-c", _PEAK_RSS, family], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["length"] == 8
    # 10**7 int64 ids alone would be 78 MiB per row; the KV cache gigabytes.
    assert result["growth_kib"] < 16 * 1024, result


def test_a_row_without_tokens(llama, monkeypatch):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    _same_as_hf(llama, monkeypatch, input_ids=ids, attention_mask=torch.tensor([[1, 1, 1],
                                                                                [0, 0, 0]]),
                max_new_tokens=3, do_sample=False)
