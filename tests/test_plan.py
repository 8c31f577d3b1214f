"""The step plan (fastdecode.plan): staging buffer, planner, sampling parameters, layer calls."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_engine import tiny_llama

from fastdecode import Engine, SamplingParams, ops
from fastdecode.hf.context import PagedContext
from fastdecode.ops import _backends, _params
from fastdecode.plan import Sampler, Staging, StepPlanner, attention as plan_attention, sampling

P = 4


# ---------------------------------------------------------------------- staging
def test_staging_regions_keep_their_address_and_grow_keeping_contents():
    stg = Staging({"a": (torch.int64, 3), "b": (torch.float32, 5)}, "cpu")
    first = stg.device_view("b", 5).data_ptr()
    stg.host("a", 3)[:] = [7, 8, 9]
    stg.upload()
    stg.host("b", 5)[:] = 1.5
    stg.upload()
    assert stg.device_view("b", 5).data_ptr() == first  # a captured graph may read it
    version = stg.version
    stg.host("a", 3)[:] = [4, 5, 6]
    assert stg.reserve(b=11)  # doubles to 20: reallocates, keeps what this step wrote
    assert stg.version == version + 1 and stg.fields["b"].capacity == 20
    assert stg.device_view("a", 3).tolist() == [4, 5, 6]
    assert not stg.reserve(a=3, b=20)
    with pytest.raises(ValueError, match="'a': 4 elements exceed its capacity 3"):
        stg.host("a", 4)


# ---------------------------------------------------------------------- planner
def _ragged(seed: int):
    rng = random.Random(seed)
    q, kv, tables = [], [], []
    for _ in range(rng.randint(1, 7)):
        k = rng.randint(1, 23)
        q.append(rng.randint(1, k))
        kv.append(k)
        tables.append(rng.sample(range(64), -(-k // P) + rng.randint(0, 2)))
    return q, kv, tables


@pytest.mark.parametrize("seed", range(6))
def test_planner_matches_the_context_built_from_lists(seed):
    q, kv, tables = _ragged(seed)
    planner = StepPlanner("cpu", P)
    ids = list(range(100, 100 + sum(q)))
    ref = PagedContext.build(tables, kv, q, P, "cpu")
    for _ in range(2):  # the second step reuses the buffers
        plan = planner.build(q, kv, tables, token_ids=ids)
        meta = plan.attn
        assert torch.equal(meta.block_tables, ref.block_tables)
        for name in ("seq_lens", "cu_seqlens_q", "slot_mapping"):
            assert torch.equal(getattr(meta, name), getattr(ref, name)), name
        assert meta.decode_only == ref.decode_only
        assert plan.input_ids.tolist() == ids
        assert plan.positions.tolist() == [k - n + i for n, k in zip(q, kv) for i in range(n)]
        if ref.decode_only:
            assert plan.logits_indices is None
        else:
            assert torch.equal(plan.logits_indices, ref.logits_indices)


def test_planner_takes_a_dense_table_array_like_lists():
    tables = np.arange(12, dtype=np.int32).reshape(3, 4)[::-1].copy()
    kv = [9, 16, 1]
    dense = StepPlanner("cpu", P).build([1, 1, 1], kv, tables)
    ragged = StepPlanner("cpu", P).build([1, 1, 1], kv, tables.tolist())
    for name in ("block_tables", "seq_lens", "slot_mapping"):
        assert torch.equal(getattr(dense.attn, name), getattr(ragged.attn, name))


def test_padded_decode_rows_are_inert_and_logits_rows_pick_last_tokens():
    planner = StepPlanner("cpu", P)
    plan = planner.build([1, 1], [3, 6], [[2], [0, 5]], token_ids=[7, 8], pad_to=5)
    assert plan.num_seqs == 5 and plan.num_real == 2
    assert plan.attn.slot_mapping.tolist() == [2 * P + 2, 5 * P + 1, -1, -1, -1]
    assert plan.attn.seq_lens.tolist() == [3, 6, 0, 0, 0]
    assert plan.input_ids.tolist() == [7, 8, 0, 0, 0]
    packed = planner.build([3, 1, 2], [3, 5, 2], [[0], [1, 2], [3]], token_ids=range(6),
                           logits_rows=[0, 2])
    assert packed.logits_indices.tolist() == [2, 5]
    verify = planner.build([3, 1, 2], [3, 5, 2], [[0], [1, 2], [3]], token_ids=range(6),
                           logits_rows=[0, 2], logits_counts=[3, 2])
    assert verify.logits_indices.tolist() == [0, 1, 2, 4, 5]
    every = planner.build([3, 1, 2], [3, 5, 2], [[0], [1, 2], [3]], token_ids=range(6),
                          logits_counts=[1, 1, 2])
    assert every.logits_indices.tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("bad, match", [
    (dict(query_lens=[2], kv_lens=[1], block_tables=[[0]]), "sequence 0: 2 new tokens"),
    (dict(query_lens=[1], kv_lens=[5], block_tables=[[0]]), "1 blocks of 4"),
    (dict(query_lens=[1, 1], kv_lens=[1], block_tables=[[0]]), "one entry per sequence"),
    (dict(query_lens=[2], kv_lens=[2], block_tables=[[0]], pad_to=4), "pad_to=4"),
])
def test_planner_refuses_inconsistent_steps(bad, match):
    with pytest.raises(ValueError, match=match):
        StepPlanner("cpu", P).build(**bad)


# ---------------------------------------------------------------------- sampling parameters
def test_shared_parameters_are_cached_scalars_with_exact_stage_flags():
    a = _params.from_host(3, 50, torch.device("cpu"), temperature=0.7, top_k=[60, 60, 60],
                          top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    b = _params.from_host(3, 50, torch.device("cpu"), temperature=0.7, top_k=0, top_p=1.0,
                          min_p=0.0, repetition_penalty=1.0)
    assert a.temperature is b.temperature  # one cached constant, no tensor per step
    assert a.top_k is b.top_k and a.top_k.tolist() == [0, 0, 0]  # top_k >= vocab is off
    assert not (a.has_top_k or a.has_top_p or a.has_min_p or a.has_penalty or a.all_greedy)


@pytest.mark.parametrize("seed", range(4))
def test_per_row_parameters_match_the_public_normalisation(seed):
    rng = random.Random(seed)
    b, vocab = rng.randint(1, 9), 37
    rows = dict(temperature=[rng.choice([0.0, 0.5, 1.3]) for _ in range(b)],
                top_k=[rng.choice([0, 3, 37, 90]) for _ in range(b)],
                top_p=[rng.choice([1.0, 0.4]) for _ in range(b)],
                min_p=[rng.choice([0.0, 0.2]) for _ in range(b)],
                repetition_penalty=[rng.choice([1.0, 1.3]) for _ in range(b)])
    seen = torch.randint(-1, vocab, (b, 6))
    ours = _params.from_host(b, vocab, torch.device("cpu"), seen_tokens=seen, **rows)
    ref = _params.normalize(torch.zeros(b, vocab), seen_tokens=seen,
                            **{k: torch.tensor(v) for k, v in rows.items()})
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    # Exact flags (the public ops set them for any per-row tensor): a stage is skipped only
    # when it changes no row.
    assert ours.has_top_k == any(0 < k < vocab for k in rows["top_k"])
    assert ours.has_top_p == any(p < 1 for p in rows["top_p"])
    assert ours.has_min_p == any(p > 0 for p in rows["min_p"])
    assert ours.has_penalty == any(r != 1 for r in rows["repetition_penalty"])
    assert ours.all_greedy == all(t == 0 for t in rows["temperature"])


def _staging() -> Staging:
    return Staging({n: (d, 4) for n, d in sampling.FIELDS.items()}, "cpu")


def test_staged_rows_draw_what_ops_sample_draws():
    vocab, rows = 29, 5
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s, repetition_penalty=r)
              for t, k, p, s, r in [(0.8, 0, 1.0, 1, 1.0), (1.2, 5, 0.9, 2, 1.0),
                                    (0.0, 0, 1.0, 3, 1.4), (1.0, 40, 0.5, 4, 1.0),
                                    (0.6, 2, 1.0, 5, 1.2)]]
    history = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [], [10, 2]]
    offsets = [3, 1, 5, 9, 2]
    sampler = Sampler(vocab, "cpu")
    stg = _staging()
    batch = sampler.stage(stg, params, offsets, history, banned=[(1, 4), (3, 0)])
    stg.upload()
    banned = logits.clone()
    banned[1, 4] = banned[3, 0] = float("-inf")
    seen = torch.full((rows, 5), -1)
    for i, h in enumerate(history):
        if params[i].repetition_penalty != 1.0:
            seen[i, :len(h)] = torch.tensor(h, dtype=torch.int64)
    ref = ops.sample(banned, seen_tokens=seen, seeds=torch.arange(1, 6),
                     offsets=torch.tensor(offsets),
                     **{n: torch.tensor([getattr(p, n) for p in params])
                        for n in ("temperature", "top_k", "top_p", "min_p",
                                  "repetition_penalty")})
    assert torch.equal(sampler.sample(logits.clone(), batch), ref)
    for j in range(rows):  # a row alone (the engine's retry) draws the same token
        assert int(sampler.sample(logits[j:j + 1].clone(), batch.row(j))[0]) == int(ref[j])


def test_a_row_breaking_the_rules_is_reported_and_sampled_neutrally():
    sampler = Sampler(11, "cpu")
    bad = SamplingParams(temperature=0.0)
    object.__setattr__(bad, "temperature", float("nan"))  # past the checks, as a bug would
    stg = _staging()
    batch = sampler.stage(stg, [SamplingParams(temperature=0.0), bad, SamplingParams(temperature=0.0)], [0, 0, 0])
    stg.upload()
    assert list(batch.errors) == [1] and "temperature" in batch.errors[1]
    assert batch.params.all_greedy  # the bad row is greedy too: the batch runs as one
    logits = torch.randn(3, 11)
    assert sampler.sample(logits.clone(), batch).tolist() == logits.argmax(-1).tolist()


# ---------------------------------------------------------------------- layer calls
def test_layers_run_through_backends_resolved_once_and_checked_once_per_signature(monkeypatch):
    # The Python layer loop's per-layer calls (the C++ loop checks its arguments once per call).
    monkeypatch.setenv("FASTDECODE_NATIVE_CPP", "0")
    engine = Engine(tiny_llama(2), num_blocks=64, max_batch_tokens=8)
    layers = engine.runner.paged.num_layers
    checks = []
    real = plan_attention.paged_attention_args
    monkeypatch.setattr(plan_attention, "paged_attention_args",
                        lambda *a, **k: checks.append(1) or real(*a, **k))

    def no_resolve(*args, **kwargs):
        raise AssertionError("a backend was resolved during a step")

    monkeypatch.setattr(_backends, "resolve", no_resolve)
    for name in ("append_kv", "paged_attention", "sample"):  # the public, checked ops
        monkeypatch.setattr(ops, name, no_resolve)
    outs = engine.generate([[5, 6, 7, 8, 9, 10, 11], [3, 4]],
                           SamplingParams(max_new_tokens=12, temperature=0.7, seed=1,
                                          ignore_eos=True))
    assert [len(o.output_ids) for o in outs] == [12, 12]
    calls = engine.runner.paged.kv.calls
    assert calls >= 12 * layers
    # A layer's checks run when its argument signature changes (packed / decode, batch
    # composition), not per step.
    assert len(checks) <= 4 * layers < calls


def test_only_the_rows_that_sample_reach_the_lm_head():
    model = tiny_llama(3)
    engine = Engine(model, num_blocks=64, max_batch_tokens=6)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    engine.add_request([5] * 13, SamplingParams(max_new_tokens=2))  # 3 chunks of prefill
    engine.step()
    engine.step()
    assert rows == [0, 0]  # chunks short of the prompt's end draw nothing
    engine.step()
    engine.step()
    assert rows[2:] == [1, 1]


def test_outputs_carry_new_tokens_and_a_view_of_the_rest():
    engine = Engine(tiny_llama(4), num_blocks=64)
    rid = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=5, temperature=0.0,
                                                       ignore_eos=True))
    outs = [o for _ in range(5) for o in engine.step()]
    final = outs[-1]
    assert final.finished and len(final.output_ids) == 5
    assert [t for o in outs for t in o.new_ids] == list(final.output_ids) == final.output_ids
    seq_tokens = final.output_ids._tokens  # the request's own list: nothing was copied
    assert all(o.output_ids._tokens is seq_tokens for o in outs)
    # Each step's view stays what it was when reported.
    assert [len(o.output_ids) for o in outs] == [1, 2, 3, 4, 5]
    assert outs[1].output_ids == final.output_ids[:2]
    assert outs[1].output_ids[-1] == outs[1].new_ids[0]
    assert rid == final.request_id
