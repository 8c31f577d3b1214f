"""Tensor parallelism: 2 gloo processes, the model sharded by transformers' plan, rank 0
scheduling and broadcasting each step, give the same greedy tokens as one process, on two
families whose installed plan splits attention by heads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from fastdecode import Engine, SamplingParams
from fastdecode.hf.tp import heads_are_sharded, load_sharded
from fastdecode.serving.tp import TensorParallelEngine, launch, run_worker
from test_engine import prompts_of

pytest.importorskip("accelerate")  # transformers' tensor-parallel loading needs it

# Decoders whose attention routes through AttentionInterface; the test takes the first two whose
# tensor-parallel plan in the installed transformers splits q/k/v by heads.
CANDIDATES = ["Llama", "Qwen2", "Mistral", "Qwen3", "Gemma", "Granite", "Starcoder2"]
VOCAB = 101
MAX_NEW = 10


def families() -> list[str]:
    found = []
    for name in CANDIDATES:
        cfg = getattr(transformers, f"{name}Config", None)
        if cfg is not None and getattr(transformers, f"{name}ForCausalLM", None) is not None:
            if heads_are_sharded(cfg()):
                found.append(name)
    return found[:2]


def save_tiny(name: str, path) -> None:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    getattr(transformers, f"{name}ForCausalLM")(cfg).eval().save_pretrained(path)


PROMPTS = prompts_of([3, 11, 17], seed=5)


def _greedy_rank(rank: int, paths: dict[str, str], out: str) -> None:
    """Every family in turn on the same 2 ranks (one launch: starting ranks is the slow part)."""
    torch.set_num_threads(1)
    results = {}
    for family, path in paths.items():
        model, _ = load_sharded(path)
        if rank != 0:
            run_worker(model)
            continue
        engine = TensorParallelEngine(model, block_size=4, num_blocks=128)
        try:
            outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW,
                                                           temperature=0.0))
        finally:
            engine.stop_workers()
        results[family] = {
            "tokens": [o.output_ids for o in outs],
            "cache_kv_heads": engine.runner.paged.k_caches[0].shape[2],
            "k_proj_rows": model.model.layers[0].self_attn.k_proj.weight.to_local().shape[0]}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> tuple[dict, dict]:
    """``(paths, results)``: each family's checkpoint and its 2-rank greedy run."""
    tmp = tmp_path_factory.mktemp("tp")
    paths = {family: str(tmp / family) for family in families()}
    for family, path in paths.items():
        save_tiny(family, path)
    out = str(tmp / "tp.json")
    launch(_greedy_rank, 2, paths, out)
    with open(out) as f:
        return paths, json.load(f)


def assert_same_or_near_tie(model, prompt, got, ref, tol=1e-4):
    """Equal, or diverging only where the reference's top-2 logits are within ``tol`` (the
    sharded matmuls sum in another order)."""
    if got == ref:
        return
    i = next(k for k, (a, b) in enumerate(zip(got + [-1], ref + [-2])) if a != b)
    with torch.no_grad():
        top = model(torch.tensor([prompt + ref[:i]])).logits[0, -1].double().topk(2).values
    assert float(top[0] - top[1]) <= tol, f"diverged at token {i}: {got} vs {ref}"


def test_families_are_found():
    assert len(families()) == 2, f"fewer than 2 of {CANDIDATES} have a head-split plan"


@pytest.mark.parametrize("family", families())
def test_two_gloo_ranks_give_the_greedy_tokens_of_one_process(family, sharded_runs):
    paths, results = sharded_runs
    model = getattr(transformers, f"{family}ForCausalLM").from_pretrained(paths[family]).eval()
    ref = Engine(model, block_size=4, num_blocks=128).generate(
        PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0))
    got = results[family]
    for prompt, tokens, r in zip(PROMPTS, got["tokens"], ref):
        assert_same_or_near_tie(model, prompt, tokens, r.output_ids)
    # each rank caches only its own key/value heads (2 of them split over 2 ranks)
    assert got["cache_kv_heads"] == 1 and got["k_proj_rows"] == 16
