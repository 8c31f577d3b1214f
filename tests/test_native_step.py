"""The native decoder step (fastdecode.models) gives the HF modules' logits over the same paged
cache: prefill, decode and mixed packed steps, four families, tied and untied heads, every
static rotary type of the installed release."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from _hf_helpers import BACKEND
from fastdecode.hf import transform
from fastdecode.hf.runner import PagedRunner
from fastdecode.models.support import STATIC_ROPE_TYPES
from tiny import tiny_model

P = 4
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Parameters of each rotary type a test model can be built with (others are skipped).
ROPE_PARAMETERS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": 128},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
}
ROPE_TYPES = sorted({"default", *ROPE_INIT_FUNCTIONS})


def forbid_hf_layers(monkeypatch, model) -> None:
    """Make any call of the HF decoder layers fail: what follows must run natively."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an HF decoder layer ran")
    monkeypatch.setattr(type(model.model.layers[0]), "forward", forbidden)


def run_steps(model, native: bool, seed: int = 0, **runner_kwargs) -> list[torch.Tensor]:
    """Three steps over shuffled blocks: a prefill (one chunk, one whole prompt), a mixed step
    (the rest of a chunked prompt, a fresh prompt, a decode token) and a decode step."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in (14, 10, 7)]
    runner = PagedRunner(model, num_blocks=12, block_size=P, backend=BACKEND, native=native,
                         **runner_kwargs)
    assert (runner.native is not None) == native
    planner = runner.planner()
    tables = [[9, 2, 5, 0], [1, 11, 7], [3, 8]]
    logits = []
    for spans in ([(0, 0, 7), (2, 0, 5)], [(0, 7, 13), (1, 0, 9), (2, 5, 6)],
                  [(0, 13, 14), (1, 9, 10), (2, 6, 7)]):  # (sequence, first, end) new tokens
        plan = planner.build([b - a for _, a, b in spans], [b for _, _, b in spans],
                             [tables[i] for i, _, _ in spans],
                             token_ids=torch.cat([seqs[i][a:b] for i, a, b in spans]).tolist())
        logits.append(runner.forward(plan.input_ids, plan.positions, plan))
    return logits


def assert_native_matches_hf(model, monkeypatch, **runner_kwargs) -> None:
    hf = run_steps(model, native=False)
    with monkeypatch.context() as m:
        forbid_hf_layers(m, model)
        ours = run_steps(model, native=True, **runner_kwargs)
    for a, b in zip(ours, hf):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_native_logits_equal_hf(family, tied, monkeypatch):
    assert_native_matches_hf(tiny_model(family, tie_word_embeddings=tied), monkeypatch)


def test_native_odd_sizes_and_biases(monkeypatch):
    """Odd hidden size, head_dim 20, GQA 5:1, biases on every attention and MLP projection."""
    model = tiny_model("llama", hidden_size=75, intermediate_size=97, num_attention_heads=5,
                       num_key_value_heads=1, head_dim=20, attention_bias=True, mlp_bias=True)
    assert_native_matches_hf(model, monkeypatch)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_rope_types(rope_type, monkeypatch):
    """Static rotary types run natively and match; the others keep the HF modules."""
    if rope_type not in ROPE_PARAMETERS:
        pytest.skip(f"no test parameters for rope type {rope_type!r}")
    params = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_PARAMETERS[rope_type]}
    model = tiny_model("llama", rope_parameters=params)
    if rope_type in STATIC_ROPE_TYPES:
        assert_native_matches_hf(model, monkeypatch)
    else:
        runner = PagedRunner(model, num_blocks=4, block_size=P, backend=BACKEND)
        assert runner.native is None


def test_packed_products_match_hf(monkeypatch):
    """The streaming kernel's packed weights (fast_linears) in the native step; the HF path's
    packed copies are then not built."""
    model = tiny_model("qwen2")
    runner = PagedRunner(model, num_blocks=4, block_size=P, backend=BACKEND, fast_linears=True)
    assert runner.native.head.product is not None and runner._layout is None
    assert_native_matches_hf(model, monkeypatch, fast_linears=True)


def test_unfused_projections_match_hf(monkeypatch):
    """Where fused copies are not affordable (transform.worth_it false: GPU, or weights over a
    quarter of RAM), q/k/v and gate/up run one product per part on the original weights."""
    model = tiny_model("qwen3")
    monkeypatch.setattr(transform, "worth_it", lambda model: False)
    runner = PagedRunner(model, num_blocks=4, block_size=P, backend=BACKEND)
    layer = runner.native.layers[0]
    assert layer.qkv.weight is None and layer.gate_up.weight is None
    o_proj = model.model.layers[0].self_attn.o_proj
    assert layer.o.weight.data_ptr() == o_proj.weight.data_ptr()  # no copy
    assert_native_matches_hf(model, monkeypatch)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_native_bfloat16_equals_hf(family, monkeypatch):
    """16-bit weights: the native step rounds where the HF modules round (norms in float32, the
    product before the residual add)."""
    assert_native_matches_hf(tiny_model(family, dtype=torch.bfloat16), monkeypatch)
