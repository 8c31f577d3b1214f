"""Which models and calls take the native step, and that fastdecode.generate and the Engine give
the same tokens with it: left-padded greedy batches against model.generate, Engine outputs
against the HF modules (FASTDECODE_NATIVE=0). Every exclusion reason keeps the HF modules."""

from __future__ import annotations

import pytest
import torch

from _hf_helpers import BACKEND, assert_greedy_match, fd_generate, padded_batch
from fastdecode import Engine, SamplingParams
from fastdecode.hf.context import PagedContext
from fastdecode.hf.runner import PagedRunner
from fastdecode.models import LlamaStep, unsupported_reason
from tiny import tiny_model

P = 4


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """Counts native step calls (one entry per call)."""
    calls: list[int] = []
    original = LlamaStep.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaStep, "__call__", counted)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_generate_left_padded_greedy_matches_model_generate(family, native_calls):
    model = tiny_model(family)
    ids, mask = padded_batch([9, 3, 12], model.config.vocab_size, seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    ref = model.generate(ids, output_scores=True, return_dict_in_generate=True, **kw)
    ours = fd_generate(model, ids, **kw)
    assert native_calls, "fastdecode.generate did not use the native step"
    assert_greedy_match(ref, ours, ids.shape[1])


def test_engine_tokens_equal_hf_modules(monkeypatch, native_calls):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 17, 11)]
    params = SamplingParams(max_new_tokens=8, temperature=0)

    def run() -> list[list[int]]:
        engine = Engine(tiny_model("qwen2"), block_size=P, num_blocks=64)
        return [out.output_ids for out in engine.generate(prompts, params)]

    ours = run()
    assert native_calls
    monkeypatch.setenv("FASTDECODE_NATIVE", "0")
    calls = len(native_calls)
    assert run() == ours and len(native_calls) == calls


def _runner(model, **kwargs) -> PagedRunner:
    return PagedRunner(model, num_blocks=8, block_size=P, backend=BACKEND, **kwargs)


def _expect_hf(model, phrase: str) -> None:
    reason = unsupported_reason(model)
    assert reason is not None and phrase in reason, reason
    assert _runner(model).native is None
    with pytest.raises(ValueError, match="native=True"):
        _runner(model, native=True)


def test_unknown_family_takes_hf_path():
    _expect_hf(tiny_model("phi3"), "no native step")


def test_other_activation_takes_hf_path():
    _expect_hf(tiny_model("llama", hidden_act="gelu"), "hidden_act")


def test_training_mode_takes_hf_path():
    _expect_hf(tiny_model("llama").train(), "training")


def test_hooks_take_hf_path():
    model = tiny_model("llama")
    model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    _expect_hf(model, "hook")


def test_subclassed_module_takes_hf_path():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.__class__ = type("MyMLP", (type(mlp),), {})
    _expect_hf(model, "MyMLP")


def test_unequal_norm_epsilons_take_hf_path():
    model = tiny_model("qwen3")
    model.model.layers[0].self_attn.k_norm.variance_epsilon = 1e-3
    _expect_hf(model, "epsilon")


def test_tensor_parallel_takes_hf_path(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(type(model), "tp_size", property(lambda self: 2))
    assert "tensor parallel" in unsupported_reason(model)


def test_switch_off_by_environment_and_argument(monkeypatch):
    model = tiny_model("llama")
    assert _runner(model).native is not None
    assert _runner(model, native=False).native is None
    monkeypatch.setenv("FASTDECODE_NATIVE", "0")
    assert _runner(model).native is None
    assert _runner(model, native=True).native is not None


def _prefill(runner: PagedRunner, ids, n: int = 9, **kwargs) -> torch.Tensor:
    ctx = PagedContext.build([[0, 1, 2]], [n], [n], P, "cpu")
    return runner.forward(ids, torch.arange(n), ctx, **kwargs)


def test_calls_the_native_step_cannot_serve_take_hf_path(native_calls):
    """inputs_embeds, and a hook on the decoder added after the runner was built (contrastive
    search captures hidden states that way)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(0))
    expected = _prefill(_runner(model, native=False), ids)
    runner = _runner(model)
    assert runner.native is not None
    embeds = model.model.embed_tokens(ids).detach()
    torch.testing.assert_close(_prefill(runner, None, inputs_embeds=embeds), expected,
                               atol=1e-5, rtol=1e-5)
    seen = []
    handle = model.model.register_forward_hook(lambda *args: seen.append(1))
    torch.testing.assert_close(_prefill(runner, ids), expected, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert seen and not native_calls
    torch.testing.assert_close(_prefill(runner, ids), expected, atol=1e-5, rtol=1e-5)
    assert native_calls
