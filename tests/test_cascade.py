"""Shared-prefix (cascade) decode attention: the planner finds the blocks every sequence shares,
the split-and-merge attention matches the float64 reference, and an Engine serving a shared
system prompt takes that path with the same greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdecode.ops._extension  # noqa: F401  (registers torch.ops.fastdecode.*)
import fastdecode.plan.attention as plan_attention
import fastdecode.plan.cascade as cascade
import reference
from fastdecode import Engine, SamplingParams
from fastdecode.models import cpp_loop
from fastdecode.models.cpp_loop import CppLoop
from fastdecode.plan.attention import PagedKVCache
from fastdecode.plan.step import StepPlanner
from test_engine import prompts_of, single_thread, tiny_llama  # noqa: F401 (autouse)


def tables_with_prefix(num_seqs: int, shared: int, width: int, num_blocks: int,
                       seed: int = 0) -> np.ndarray:
    """[B, width] int32: the same ``shared`` leading block ids in every row, distinct after."""
    ids = np.random.default_rng(seed).permutation(num_blocks).astype(np.int32)
    own = ids[shared:shared + num_seqs * (width - shared)].reshape(num_seqs, width - shared)
    return np.concatenate([np.broadcast_to(ids[:shared], (num_seqs, shared)), own], axis=1)


def test_shared_blocks_stop_at_the_first_difference_and_before_each_last_token():
    t = tables_with_prefix(5, 3, 6, 64)
    assert cascade.shared_blocks(t, np.full(5, 6 * 4), 4) == 3
    t[2, 1] = t[2, 5]  # one sequence diverges at its second block
    assert cascade.shared_blocks(t, np.full(5, 6 * 4), 4) == 1
    t = tables_with_prefix(5, 6, 6, 64)  # all blocks shared (forks of one sequence)
    # A sequence of 2 * 4 + 1 tokens writes its token in block 2: only blocks 0, 1 are read-only.
    assert cascade.shared_blocks(t, np.array([24, 9, 24, 24, 24]), 4) == 2
    assert cascade.shared_blocks(t, np.array([24, 8, 24, 24, 24]), 4) == 1


def planner(block_size: int) -> StepPlanner:
    kv = PagedKVCache(num_layers=1, num_blocks=128, block_size=block_size, num_kv_heads=1,
                      head_dim=16, num_qo_heads=1, dtype=torch.float32, device="cpu")
    assert kv.shared_prefix_decode
    return StepPlanner("cpu", block_size, kv=kv)


def test_planner_plans_the_shared_prefix_of_decode_steps_only():
    size, b, c = 4, cascade.MIN_SEQS + 1, cascade.MIN_SHARED_BLOCKS + 1
    tables = tables_with_prefix(b, c, c + 3, 128)
    kv = [c * size + 1 + i for i in range(b)]
    plan = planner(size).build([1] * b, kv, tables)
    sp = plan.attn.shared_prefix
    assert sp is not None and sp.tables.tolist() == [tables[0, :c].tolist()]
    assert sp.suffix_tables.tolist() == tables[:, c:].tolist()
    assert sp.suffix_lens.tolist() == [n - c * size for n in kv]
    assert planner(size).build([2] * b, kv, tables).attn.shared_prefix is None
    few = planner(size).build([1] * (cascade.MIN_SEQS - 1), kv[:-2], tables[:-2])
    assert few.attn.shared_prefix is None
    tables[0, 0] = tables[0, -1]  # nothing shared
    assert planner(size).build([1] * b, kv, tables).attn.shared_prefix is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((4, 4), 80), ((6, 1), 96)])
@pytest.mark.parametrize("block_size,shared,batch", [(16, 5, 7), (5, 9, 4), (1, 23, 5)])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_merged_attention_matches_the_float64_reference(dtype, heads, head_dim, block_size,
                                                        shared, batch, softcap):
    hq, hkv = heads
    g = torch.Generator().manual_seed(block_size * 131 + shared)
    width = shared + 4
    num_blocks = shared + batch * 4 + 3
    tables = tables_with_prefix(batch, shared, width, num_blocks)
    # Suffixes from one token (the step's own) to all four own blocks full.
    own = torch.randint(1, 4 * block_size + 1, (batch,), generator=g).numpy()
    own[0], own[-1] = 1, 4 * block_size
    kv = shared * block_size + own
    k = torch.randn(num_blocks, block_size, hkv, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, hkv, head_dim, generator=g).to(dtype)
    q = (2 * torch.randn(batch, hq, head_dim, generator=g)).to(dtype)
    plan = cascade.plan_shared_prefix(tables, kv, block_size)
    assert plan is not None and plan.tables.shape[1] == shared
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5
    cascade.attend_shared_prefix(q, k, v, plan, out, scale=scale, softcap=softcap)
    args = (q, k, v, torch.from_numpy(tables), torch.from_numpy(kv.astype(np.int32)))
    ref64 = reference.paged_attention(*args, scale=scale, softcap=softcap or None)
    ref_lowp = reference.paged_attention(*args, scale=scale, softcap=softcap or None,
                                         upcast=False)
    reference.assert_close_2x(out, ref64, ref_lowp, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_lse_is_the_log_sum_exp_of_the_scaled_logits():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(6, 3, 2, 16, generator=g, dtype=torch.float64).float()
    q = torch.randn(2, 4, 16, generator=g, dtype=torch.float64).float()
    tables = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    lens = torch.tensor([7, 0], dtype=torch.int32)  # a row with no key: -inf
    out, lse = torch.empty_like(q), torch.empty(2, 4)
    torch.ops.fastdecode.paged_attention_lse(out, lse, q, k, k, tables, lens, None, 0.3, True,
                                             0.0)
    keys = reference.gather_kv(k, tables[0], 7).double()  # [7, Hkv, D]
    logits = torch.einsum("hd,thd->ht", q[0].double(), keys.repeat_interleave(2, dim=1)) * 0.3
    torch.testing.assert_close(lse[0].double(), logits.logsumexp(-1), rtol=1e-6, atol=1e-6)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    torch.library.opcheck(torch.ops.fastdecode.paged_attention_lse,
                          (out, lse, q, k, k, tables, lens, None, 0.3, True, 0.0))
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.fastdecode.paged_attention_lse(out, torch.empty(2, 3), q, k, k, tables, lens,
                                                 None, 0.3, True, 0.0)


@pytest.mark.parametrize("native_cpp", ["0", "1"])
def test_engine_with_a_shared_system_prompt_decodes_through_the_shared_prefix(native_cpp,
                                                                             monkeypatch):
    """Through the Python layer loop's attention and through the C++ layer loop."""
    if native_cpp == "1" and not cpp_loop.available():
        pytest.skip("the C++ layer loop is not built")
    monkeypatch.setenv("FASTDECODE_NATIVE_CPP", native_cpp)
    calls = []
    attend = plan_attention.attend_shared_prefix
    monkeypatch.setattr(plan_attention, "attend_shared_prefix",
                        lambda *a, **kw: calls.append(1) or attend(*a, **kw))
    loop_calls = []
    loop = CppLoop.__call__
    monkeypatch.setattr(CppLoop, "__call__", lambda self, h, positions, plan, kv: loop_calls.append(
        plan.attn.shared_prefix is not None) or loop(self, h, positions, plan, kv))
    system = prompts_of([cascade.MIN_SHARED_BLOCKS * 5 + 3], seed=1)[0]
    prompts = [system + p for p in prompts_of([1, 4, 9, 13, 20], seed=2)]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    default = cascade.MIN_SEQS
    assert len(prompts) >= default

    def run(min_seqs: int) -> list[list[int]]:
        monkeypatch.setattr(cascade, "MIN_SEQS", min_seqs)
        engine = Engine(tiny_llama(0), block_size=5, num_blocks=96)
        return [o.output_ids for o in engine.generate(prompts, params)]

    plain = run(len(prompts) + 1)
    assert not calls and not any(loop_calls)
    shared = run(default)
    # Decode steps with all five running took the cascade path, in the loop that ran them.
    assert (any(loop_calls) and not calls) if native_cpp == "1" else (calls and not loop_calls)
    assert shared == plain
