"""``cache_implementation`` and ``compile_config``: options about the cache's memory layout and
compilation, not about the tokens.

Every cache implementation of the installed release whose values equal the dynamic cache's runs
natively with ``model.generate``'s tokens and returns HF's cache of the kind asked for; a lossy
one falls back. ``compile_config`` runs on the paged cache when HF's own criteria would not
compile, and through HF's compiled forward (fed by fastdecode's loop) when they would.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig
from transformers.generation import configuration_utils as hfconfig

from _hf_helpers import count_paged_calls, fd_generate, forbid_original_generate, padded_batch
from fastdecode.hf import compat
from fastdecode.hf.generate import FallbackError
from tiny import tiny_model

NEW = 5
BASE = dict(max_new_tokens=NEW, do_sample=False)
# The release's own lists; "quantized" changes the values (and needs a quantization backend).
LOSSY = ("quantized",)
SAME_VALUE = tuple(c for c in hfconfig.ALL_CACHE_IMPLEMENTATIONS if c not in LOSSY)


@pytest.fixture(scope="module", params=["llama", "mistral"])  # mistral: a window of 7
def model(request):
    return tiny_model(request.param)


def _hf(model, **kwargs):
    """HF's output of the call, or a skip when this release cannot run it here."""
    try:
        return model.generate(**copy.deepcopy(kwargs))
    except Exception as exc:  # noqa: BLE001 (e.g. offloading asserts that CUDA is there)
        pytest.skip(f"model.generate cannot run this call here: {exc}")


@pytest.mark.parametrize("implementation", SAME_VALUE)
def test_same_value_caches_run_natively(model, implementation, monkeypatch):
    ids, mask = padded_batch([9, 4, 6], model.config.vocab_size, seed=4)
    kwargs = dict(input_ids=ids, attention_mask=mask, cache_implementation=implementation,
                  return_dict_in_generate=True, **BASE)
    ref = _hf(model, **kwargs)
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        out = fd_generate(model, **kwargs)
    assert counts["paged_attention"] > 0  # the paged cache, not HF's, served the steps
    assert torch.equal(out.sequences, ref.sequences)
    field = compat.output_cache_field()
    ours, theirs = getattr(out, field), getattr(ref, field)
    assert type(ours) is type(theirs)
    assert [type(layer) for layer in ours.layers] == [type(layer) for layer in theirs.layers]
    assert [layer.keys.shape for layer in ours.layers] == [layer.keys.shape
                                                             for layer in theirs.layers]


def test_static_cache_of_a_right_padded_call_matches_hf(model, monkeypatch):
    """Calls that need HF's own masks run HF's static cache itself, fed by fastdecode's loop."""
    ids, _ = padded_batch([7, 7], model.config.vocab_size, seed=5)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, cache_implementation="static", **BASE)
    ref = _hf(model, **kwargs)
    forbid_original_generate(monkeypatch)
    assert torch.equal(fd_generate(model, **kwargs), ref)


@pytest.mark.parametrize("implementation", LOSSY)
def test_lossy_caches_fall_back(implementation):
    model = tiny_model("llama")
    ids, mask = padded_batch([5, 3], model.config.vocab_size, seed=6)
    with pytest.raises(FallbackError, match=f"cache_implementation='{implementation}'"):
        fd_generate(model, ids, attention_mask=mask, cache_implementation=implementation,
                    fallback="error", **BASE)


def test_compile_config_that_hf_would_not_compile_runs_paged(monkeypatch):
    """On a CPU without ``_compile_all_devices`` HF skips compilation: so does fastdecode, on the
    paged cache."""
    model = tiny_model("llama")
    ids, mask = padded_batch([6, 2], model.config.vocab_size, seed=7)
    kwargs = dict(input_ids=ids, attention_mask=mask, compile_config=CompileConfig(),
                  cache_implementation="static", **BASE)
    ref = _hf(model, **kwargs)
    assert not hasattr(model, "_compiled_call")
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        out = fd_generate(model, **kwargs)
    assert counts["paged_attention"] > 0
    assert torch.equal(out, ref)


def test_compile_config_that_hf_compiles_runs_its_compiled_forward(monkeypatch):
    """With the criteria met (forced on CPU), decode steps go through HF's compiled forward over
    HF's static cache, as ``model.generate`` runs them; the tokens are HF's."""
    model = tiny_model("llama")
    ids, mask = padded_batch([6, 2], model.config.vocab_size, seed=8)
    config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    config._compile_all_devices = True  # HF's switch for compiling off accelerators
    kwargs = dict(input_ids=ids, attention_mask=mask, compile_config=config,
                  cache_implementation="static", **BASE)
    ref = tiny_model("llama").generate(**kwargs)  # the same weights, compiled on its own
    calls = []
    compiled = model.get_compiled_call

    def recorded(compile_config):
        calls.append(compile_config)
        return compiled(compile_config)

    monkeypatch.setattr(model, "get_compiled_call", recorded)
    forbid_original_generate(monkeypatch)
    with count_paged_calls(monkeypatch) as counts:
        out = fd_generate(model, **kwargs)
    assert calls == [config] and hasattr(model, "_compiled_call")
    assert counts["paged_attention"] == 0
    assert torch.equal(out, ref)
