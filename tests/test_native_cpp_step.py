"""The native step's C++ layer loop (torch.ops.fastdecode.decoder_layers): logits equal the
Python loop's and HF's on four families with awkward sizes, ragged KV lengths, shuffled blocks
and packed multi-token steps; greedy generate equals model.generate; bad arguments name
themselves."""

from __future__ import annotations

import pytest
import torch

import fastdecode
from _hf_helpers import BACKEND
from fastdecode.hf import runner as runner_module
from fastdecode.hf.runner import PagedRunner
from fastdecode.models.cpp_loop import CppLoop
from fastdecode.models import layers
from fastdecode.plan import cascade
from test_native_step import forbid_hf_layers
from tiny import tiny_model

pytestmark = pytest.mark.skipif(
    not (layers.cpu_kernels() and hasattr(torch.ops.fastdecode, "decoder_layers")),
    reason="C++ extension not built")

P = 4
# Awkward sizes per family: GQA, head_dim not 64, odd counts, biases (qwen2), q/k norms (qwen3),
# a window shorter than the prompts (mistral).
MODELS = {
    "llama": dict(hidden_size=75, intermediate_size=97, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=20, num_hidden_layers=3,
                  attention_bias=True, mlp_bias=True),
    "mistral": dict(hidden_size=48, intermediate_size=72, num_attention_heads=3,
                    num_key_value_heads=3, head_dim=18),
    "qwen2": dict(num_attention_heads=6, num_key_value_heads=2),
    "qwen3": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1, head_dim=14),
}


def run_steps(model, mode: str, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """(logits, Python-loop attention calls) of a prefill, a mixed packed step and three decode
    steps of ragged sequences over shuffled blocks; mode: "cpp" (the C++ loop), "python" (the
    native step's Python loop) or "hf" (the HF modules)."""
    monkeypatch.setenv("FASTDECODE_NATIVE_CPP", "1" if mode == "cpp" else "0")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (17, 11, 6)]
    runner = PagedRunner(model, num_blocks=16, block_size=P, backend=BACKEND,
                         native=mode != "hf", fast_linears=True)
    planner = runner.planner()
    tables = [[9, 2, 5, 0, 14], [1, 11, 7], [3, 8, 13]]
    steps = [[(0, 0, 7), (2, 0, 5)], [(0, 7, 14), (1, 0, 9), (2, 5, 6)],
             *([(0, 14 + i, 15 + i), (1, 9 + i, 10 + i)] for i in range(2)),
             [(0, 16, 17), (1, 11 - 1, 11), (2, 5, 6)]]
    logits = []
    for spans in steps:  # (sequence, first, end) new tokens
        plan = planner.build([b - a for _, a, b in spans], [b for _, _, b in spans],
                             [tables[i] for i, _, _ in spans],
                             token_ids=torch.cat([seqs[i][a:b] for i, a, b in spans]).tolist())
        logits.append(runner.forward(plan.input_ids, plan.positions, plan))
    return logits, runner.kv.calls


@pytest.mark.parametrize("family", sorted(MODELS))
def test_cpp_loop_equals_python_loop_and_hf(family, monkeypatch):
    model = tiny_model(family, **MODELS[family])
    hf, _ = run_steps(model, "hf", monkeypatch)
    with monkeypatch.context() as m:
        forbid_hf_layers(m, model)
        python, python_calls = run_steps(model, "python", m)
        cpp, cpp_calls = run_steps(model, "cpp", m)
    assert python_calls > 0 and cpp_calls == 0  # the C++ loop ran every step
    for a, b, c in zip(cpp, python, hf):
        assert a.shape == b.shape == c.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_generate_greedy_equals_model_generate(monkeypatch):
    model = tiny_model("qwen3", **MODELS["qwen3"])
    monkeypatch.setattr(runner_module, "_large_linears", lambda model: True)  # pack the products
    calls = []
    run = CppLoop.__call__
    monkeypatch.setattr(CppLoop, "__call__", lambda self, *a: calls.append(1) or run(self, *a))
    prompts = torch.randint(3, model.config.vocab_size, (3, 9), generator=torch.Generator()
                            .manual_seed(1))
    hf = model.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = fastdecode.generate(model, prompts, max_new_tokens=12, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(ours, hf) and len(calls) >= 11


def shared_prefix_steps(model, mode: str, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """(logits, Python-loop attention calls) of two decode steps of five sequences whose first
    four blocks hold one 16-token system prompt (their prompts prefilled first: the prompt and
    one sequence's own tokens, then the others' own tokens); mode: "cpp" or "python" (which
    loop; both plan the shared prefix), or "plain" (no shared-prefix plan, C++ loop)."""
    monkeypatch.setenv("FASTDECODE_NATIVE_CPP", "0" if mode == "python" else "1")
    if mode == "plain":
        monkeypatch.setattr(cascade, "MIN_SEQS", 99)
    g = torch.Generator().manual_seed(1)
    own = [3, 1, 6, 2, 5]  # tokens past the prompt, then two decode tokens each
    seqs = [torch.randint(3, model.config.vocab_size, (16 + n + 2,), generator=g) for n in own]
    for s in seqs[1:]:
        s[:16] = seqs[0][:16]
    runner = PagedRunner(model, num_blocks=32, block_size=P, backend=BACKEND, native=True,
                         fast_linears=True)
    planner = runner.planner()
    tables = [[0, 1, 2, 3, *range(4 + 3 * i, 7 + 3 * i)] for i in range(len(seqs))]
    steps = [[(0, 0, 16 + own[0])], [(i, 16, 16 + own[i]) for i in range(1, len(seqs))],
             *([(i, 16 + n + j, 17 + n + j) for i, n in enumerate(own)] for j in range(2))]
    logits, shared = [], []
    for spans in steps:  # (sequence, first, end) new tokens
        plan = planner.build([b - a for _, a, b in spans], [b for _, _, b in spans],
                             [tables[i] for i, _, _ in spans],
                             token_ids=torch.cat([seqs[i][a:b] for i, a, b in spans]).tolist())
        shared.append(plan.attn.shared_prefix is not None)
        logits.append(runner.forward(plan.input_ids, plan.positions, plan))
    assert shared == [False, False, *(2 * [mode != "plain"])]
    return logits[2:], runner.kv.calls


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_shared_prefix_steps_take_the_cascade_in_the_loop(family, monkeypatch):
    """The loop's shared-prefix attention (mistral: a window, so plain decode attention in every
    layer) gives the Python loop's cascade logits and those of plain decode attention."""
    model = tiny_model(family, **MODELS[family])
    results = {}
    for mode in ("cpp", "python", "plain"):
        with monkeypatch.context() as m:
            results[mode] = shared_prefix_steps(model, mode, m)
    assert results["cpp"][1] == 0 and results["python"][1] > 0
    for cpp, python, plain in zip(*(results[m][0] for m in ("cpp", "python", "plain"))):
        torch.testing.assert_close(cpp, python, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cpp, plain, atol=1e-5, rtol=1e-5)


def _loop_args(runner, plan):
    loop = runner.native.cpp_loop
    h = torch.zeros(plan.num_tokens, runner.model.config.hidden_size)
    meta = plan.attn
    return [h, plan.positions, list(loop.flat), runner.kv.k_caches, runner.kv.v_caches,
            list(loop.windows), meta.block_tables, meta.seq_lens, None, meta.slot_mapping,
            loop.inv_freq, loop.scaling, loop.num_heads, loop.eps, loop.scale, []]


@pytest.mark.parametrize("index, value, message", [
    (0, torch.zeros(112), r"hidden must be a contiguous \[T, H\]"),
    (1, torch.zeros(2, dtype=torch.int32), "positions"),
    (5, [-1, 0], r"sliding_windows\[layer\]"),
    (12, 0, "num_heads"),
    (13, float("nan"), "eps"),
    (15, [torch.zeros(1, 1, dtype=torch.int32)], "shared_prefix must be empty or"),
])
def test_op_errors_name_the_argument(index, value, message):
    model = tiny_model("qwen3", **MODELS["qwen3"])
    runner = PagedRunner(model, num_blocks=8, block_size=P, backend=BACKEND, native=True,
                         fast_linears=True)
    plan = runner.planner().build([1, 1], [3, 5], [[2], [6, 1]], token_ids=[4, 5])
    args = _loop_args(runner, plan)
    torch.ops.fastdecode.decoder_layers(*args)  # the unchanged arguments pass
    args[index] = value
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.fastdecode.decoder_layers(*args)


def test_op_error_names_the_layer_weight():
    model = tiny_model("llama", **MODELS["llama"])
    runner = PagedRunner(model, num_blocks=8, block_size=P, backend=BACKEND, native=True,
                         fast_linears=True)
    plan = runner.planner().build([1], [3], [[2]], token_ids=[4])
    args = _loop_args(runner, plan)
    args[2][12 + 5] = args[2][12 + 5][:-1]  # layer 1's packed o: one panel short
    with pytest.raises(ValueError, match=r"layer 1 o"):
        torch.ops.fastdecode.decoder_layers(*args)


def test_op_passes_opcheck():
    model = tiny_model("qwen3", **MODELS["qwen3"])
    runner = PagedRunner(model, num_blocks=8, block_size=P, backend=BACKEND, native=True,
                         fast_linears=True)
    plan = runner.planner().build([1, 1], [3, 5], [[2], [6, 1]], token_ids=[4, 5])
    args = _loop_args(runner, plan)
    args[0] = torch.randn(args[0].shape)
    torch.library.opcheck(torch.ops.fastdecode.decoder_layers, tuple(args))
