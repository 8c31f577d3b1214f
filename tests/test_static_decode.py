"""Decode steps with static shapes: buckets, torch.compile(fullgraph=True) on CPU, CUDA graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

from fastdecode.hf.graphs import CompiledDecode, CudaGraphDecode, bucket_for, bucket_sizes
from fastdecode.hf.runner import PagedRunner

P = 4
WIDTH = 8  # blocks per sequence


def test_buckets_cover_every_batch_size():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 8]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 32, 48]
    sizes = bucket_sizes(70)
    for b in range(1, 71):
        size = bucket_for(b, sizes)
        assert size >= b and all(s < b for s in sizes if s < size)
    with pytest.raises(ValueError, match="exceeds the largest bucket 80"):
        bucket_for(81, sizes)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        bucket_sizes(0)


def _decode(family: str, device: str, make_step, steps: int = 5) -> list[list[int]]:
    """Greedy tokens of 3 rows: an eager packed prefill, then ``steps`` decode steps through
    ``make_step(runner, planner)`` (a CompiledDecode / CudaGraphDecode, or None: eager)."""
    model = tiny_model(family).to(device)
    runner = PagedRunner(model, num_blocks=3 * WIDTH, block_size=P, fast_linears=False)
    planner = runner.planner()
    step = make_step(runner, planner) if make_step else None
    lens = np.array([5, 2, 9])
    tables = np.arange(3 * WIDTH, dtype=np.int32).reshape(3, WIDTH)
    ids = torch.randint(3, model.config.vocab_size, (int(lens.sum()),),
                        generator=torch.Generator().manual_seed(0))
    plan = planner.build(lens, lens, tables, token_ids=ids.tolist())
    tokens = runner.forward(plan.input_ids, plan.positions, plan).argmax(-1)
    out = [tokens.tolist()]
    for _ in range(steps):
        lens = lens + 1
        if step is None:
            plan = planner.build(np.ones(3, np.int64), lens, tables, input_ids=tokens)
            logits = runner.forward(plan.input_ids, plan.positions, plan)
        else:
            logits = step(step.plan(lens, tables, input_ids=tokens))
        tokens = logits.argmax(-1)
        out.append(tokens.tolist())
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_cpu_decode_step_has_no_graph_break_and_gives_eager_tokens(family):
    """fullgraph=True fails on any graph break, and a host read of a device value (.item(),
    .tolist()) is one: the step is capturable. aot_eager traces through the ops' fake
    implementations without generating code (inductor takes minutes on a small CPU)."""
    torch._dynamo.reset()
    ref = _decode(family, "cpu", None)
    ours = _decode(family, "cpu", lambda r, p: CompiledDecode(
        r, p, max_batch=3, max_blocks_per_seq=WIDTH, backend="aot_eager"))
    assert ours == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cuda_graph_decode_replays_eager_tokens(family):
    ref = _decode(family, "cuda", None)
    ours = _decode(family, "cuda", lambda r, p: CudaGraphDecode(
        r, p, max_batch=3, max_blocks_per_seq=WIDTH))
    assert ours == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_are_recaptured_after_the_cache_grows():
    model = tiny_model("llama").cuda()
    runner = PagedRunner(model, num_blocks=2 * WIDTH, block_size=P, fast_linears=False)
    graphs = CudaGraphDecode(runner, runner.planner(), max_batch=2, max_blocks_per_seq=WIDTH)
    graphs.capture()
    assert not graphs._stale()
    runner.grow(4 * WIDTH)
    assert graphs._stale()
    tables = np.arange(2 * WIDTH, dtype=np.int32).reshape(2, WIDTH)
    logits = graphs(graphs.plan(np.array([1, 1]), tables, token_ids=[5, 6]))
    assert not graphs._stale() and logits.shape == (2, model.config.vocab_size)
    eager = runner.forward(*_replan(runner, tables))
    torch.testing.assert_close(logits, eager)


def _replan(runner, tables):
    """The same step again, eagerly (it rewrites the same slots with the same values)."""
    plan = runner.planner().build([1, 1], [1, 1], tables, token_ids=[5, 6])
    return plan.input_ids, plan.positions, plan
