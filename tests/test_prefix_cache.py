"""Prefix caching: full blocks keyed by a hash chain, shared by reference, LRU eviction; the
same greedy tokens with and without it; every block accounted for after preemption and abort."""

from __future__ import annotations

import pytest

from fastdecode import Engine, SamplingParams
from fastdecode.engine.block_manager import BlockManager
from fastdecode.engine.scheduler import Scheduler
from fastdecode.engine.sequence import Sequence
from test_engine import (VOCAB, assert_same_greedy, prompts_of,  # noqa: F401 (autouse)
                         single_thread, tiny_llama)


def assert_accounted(bm: BlockManager, tables: list[list[int]]) -> None:
    """Each block's reference count is the number of tables holding it; the free blocks are
    exactly the unheld ones."""
    held = [0] * bm.num_blocks
    for t in tables:
        for b in t:
            held[b] += 1
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == held
    assert bm.num_free_blocks == held.count(0)


def computed(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """A table holding ``tokens`` with every full block registered, as after a prefill."""
    table, hashes = [], []
    bm.append_slots(table, 0, len(tokens))
    bm.hash_blocks(tokens, hashes)
    bm.cache_blocks(table, hashes, 0, len(tokens))
    return table, hashes


def test_hash_chain_keys_a_block_by_everything_before_it():
    bm = BlockManager(16, 4, enable_caching=True)
    a, b = [], []
    bm.hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], a)
    bm.hash_blocks([9, 9, 9, 9, 5, 6, 7, 8], b)
    assert len(a) == 2 and len(b) == 2  # full blocks only
    assert a[0] != b[0] and a[1] != b[1]  # same tokens in block 1, different prefix
    c = a[:1]
    bm.hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], c)  # incremental extension gives the same chain
    assert c == a


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_cached_blocks_are_shared_by_reference_and_freed_to_an_lru(block_size):
    bm = BlockManager(24, block_size, enable_caching=True)
    tokens = list(range(10, 10 + 5 * block_size - 1))  # four full blocks, one partial
    table, hashes = computed(bm, tokens)
    assert bm.num_cached_blocks == 4
    hits = bm.lookup(hashes, 10)
    assert hits == table[:4]
    other: list[int] = []
    bm.share(other, hits, len(tokens))
    assert all(bm.ref_count(b) == 2 for b in hits)
    assert bm.hit_rate == 4 * block_size / len(tokens)
    assert_accounted(bm, [table, other])
    bm.free(table)
    bm.free(other)
    assert_accounted(bm, [])
    assert bm.num_cached_blocks == 4  # still cached, though free
    # Taking every plain free block leaves the cache alone; the next takes evict, the
    # last-freed block of a table (its tail) first.
    plain = bm.num_blocks - 4
    filler: list[int] = []
    bm.append_slots(filler, 0, plain * block_size)
    assert bm.num_cached_blocks == 4
    bm.append_slots(filler, plain * block_size, block_size)
    assert bm.num_cached_blocks == 3 and bm.lookup(hashes, 10) == hits[:3]
    assert_accounted(bm, [filler])


def test_caching_off_registers_nothing():
    bm = BlockManager(8, 2)
    table, hashes = computed(bm, [5, 6, 7, 8])
    assert hashes == [] and bm.num_cached_blocks == 0 and bm.lookup(hashes, 5) == []
    bm.free(table)
    assert bm.num_free_blocks == 8


def sequence(rid: str, tokens: list[int], arrival: int) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_new_tokens=2), arrival, frozenset())


@pytest.mark.parametrize("suffix", [0, 1, 3])
def test_scheduler_starts_a_prompt_after_its_cached_blocks(suffix):
    bm = BlockManager(32, 4, enable_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_batch_tokens=64)
    shared = list(range(3, 15))  # three full blocks
    first = sequence("a", shared + [40] * suffix, 0)
    sched.add(first)
    batch = sched.schedule()
    sched.postprocess(batch, [[50]], {})
    second = sequence("b", shared + [41] * suffix, 1)
    sched.add(second)
    batch = sched.schedule()
    # At least one token is computed: with no suffix the last shared block is recomputed.
    hit_blocks = 3 if suffix else 2
    assert batch.seqs == [first, second]
    assert batch.num_new == [1, len(second.prompt_ids) - 4 * hit_blocks]
    assert second.block_table[:hit_blocks] == first.block_table[:hit_blocks]
    assert all(bm.ref_count(b) == 2 for b in first.block_table[:hit_blocks])
    assert_accounted(bm, [first.block_table, second.block_table])


def tiny_engine(seed=0, **kw) -> Engine:
    return Engine(tiny_llama(seed), block_size=kw.pop("block_size", 4), **kw)


def staggered(engine: Engine, prompts, params, shared_blocks=None) -> list[list[int]]:
    """Submit one prompt per step (later ones find the earlier ones' blocks cached); return
    the outputs in prompt order. ``shared_blocks`` collects the blocks held by more than one
    running request at each step."""
    ids, done = [], {}
    pending = list(prompts)
    while pending or engine.has_unfinished():
        if pending:
            ids.append(engine.add_request(pending.pop(0), params))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_ids
        if shared_blocks is not None:
            refs = [engine.blocks.ref_count(b) for b in range(engine.blocks.num_blocks)]
            shared_blocks.append(sum(r > 1 for r in refs))
    return [done[i] for i in ids]


def shared_prefix_prompts(n: int, system_len: int, seed: int = 0) -> list[list[int]]:
    system = prompts_of([system_len], seed)[0]
    return [system + s for s in prompts_of([1 + 3 * i for i in range(n)], seed + 1)]


def test_same_greedy_tokens_with_and_without_prefix_caching():
    prompts = shared_prefix_prompts(5, 21)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    off = staggered(tiny_engine(num_blocks=64, enable_prefix_caching=False), prompts, params)
    on_engine = tiny_engine(num_blocks=64)
    shared: list[int] = []
    on = staggered(on_engine, prompts, params, shared)
    for p, a, b in zip(prompts, on, off):
        assert_same_greedy(0, p, a, b)
    assert max(shared) >= 5  # the system prompt's 5 full blocks held by several requests
    stats = on_engine.stats
    assert stats["prefix_cache_hits"] >= 4 * 5 * 4  # later requests found the 5 blocks
    assert 0 < stats["prefix_cache_hit_rate"] < 1
    assert_accounted(on_engine.blocks, [])
    off_stats = tiny_engine(num_blocks=64, enable_prefix_caching=False).stats
    assert off_stats["prefix_cache_hit_rate"] == 0 and off_stats["cached_blocks"] == 0


def test_a_request_sent_again_reuses_its_blocks_after_it_finished():
    engine = tiny_engine(num_blocks=64)
    prompt = prompts_of([30])[0]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    first = engine.generate([prompt], params)[0].output_ids
    prefill_tokens = []
    rid = engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
        prefill_tokens.append(engine.stats["prefill_tokens"])
    assert [o.output_ids for o in outs if o.finished and o.request_id == rid] == [first]
    assert prefill_tokens[0] == 30 - 7 * 4  # only the partial last block is computed again


def test_preemption_and_abort_leave_every_block_accounted_for():
    # A cache too small for all requests at once: preemptions happen, with shared blocks.
    engine = tiny_engine(num_blocks=24)
    prompts = shared_prefix_prompts(6, 17, seed=3)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    finished = {}
    for step in range(400):
        if not engine.has_unfinished():
            break
        if step == 12:
            engine.abort(ids[1])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        assert_accounted(engine.blocks, [s.block_table for s in engine.scheduler.running])
    assert engine.stats["preemptions"] > 0
    assert set(finished) == set(ids) and finished[ids[1]].finish_reason == "abort"
    assert all(finished[i].finish_reason == "length" for i in ids if i != ids[1])
    assert_accounted(engine.blocks, [])
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]
    # and the survivors' tokens are those of an engine without caching
    ref = tiny_engine(num_blocks=256, enable_prefix_caching=False).generate(prompts, params)
    for i, (p, r) in enumerate(zip(prompts, ref)):
        if i != 1:
            assert_same_greedy(0, p, finished[ids[i]].output_ids, r.output_ids)


def test_vocab_sized_prompts_hash_without_overflow():
    bm = BlockManager(4, 2, enable_caching=True)
    hashes: list[bytes] = []
    bm.hash_blocks([VOCAB - 1, 2 ** 62, 0, 1], hashes)
    assert len(hashes) == 2 and len(set(hashes)) == 2


def test_blocks_a_step_fills_are_shared_within_that_step_only():
    bm = BlockManager(16, 4, enable_caching=True)
    tokens = list(range(3, 14))  # two full blocks and a partial one
    owner: list[int] = []
    hashes: list[bytes] = []
    bm.append_slots(owner, 0, len(tokens))
    bm.hash_blocks(tokens, hashes)
    bm.expect(owner, hashes, 0, len(tokens))
    assert bm.lookup(hashes, 5) == owner[:2] and bm.num_cached_blocks == 0
    bm.clear_expected()  # the next step: only what the results registered counts
    assert bm.lookup(hashes, 5) == []
    bm.expect(owner, hashes, 0, 4)  # a chunk that fills the first block only
    assert bm.lookup(hashes, 5) == owner[:1]
    bm.free(owner)  # its writer gave it up (preempted): nobody fills it
    assert bm.lookup(hashes, 5) == [] and bm.num_free_blocks == 16


@pytest.mark.parametrize("suffix", [0, 2])
def test_a_burst_shares_the_prefix_its_first_request_computes(suffix):
    bm = BlockManager(32, 4, enable_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_batch_tokens=64)
    shared = list(range(3, 15))  # three full blocks
    seqs = [sequence(f"r{i}", shared + [40 + i] * suffix, i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()  # one step admits all three
    hit_blocks = 3 if suffix else 2
    assert batch.seqs == seqs
    assert batch.num_new == [12 + suffix] + [12 + suffix - 4 * hit_blocks] * 2
    assert all(s.block_table[:hit_blocks] == seqs[0].block_table[:hit_blocks] for s in seqs)
    assert_accounted(bm, [s.block_table for s in seqs])


def test_same_greedy_tokens_for_a_burst_with_and_without_prefix_caching():
    prompts = shared_prefix_prompts(6, 23, seed=7)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    engines = {on: tiny_engine(num_blocks=96, enable_prefix_caching=on) for on in (True, False)}
    outs, first_prefill = {}, {}
    for on, engine in engines.items():
        ids = [engine.add_request(p, params) for p in prompts]  # all before the first step
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o.output_ids for o in engine.step() if o.finished})
            first_prefill.setdefault(on, engine.stats["prefill_tokens"])
        outs[on] = [done[i] for i in ids]
    for p, a, b in zip(prompts, outs[True], outs[False]):
        assert_same_greedy(0, p, a, b)
    # the 5 full blocks of the system prompt are computed once, in the first step
    assert first_prefill[True] == first_prefill[False] - 5 * 4 * 5
    assert_accounted(engines[True].blocks, [])


def test_a_failed_step_does_not_leave_requests_on_unfilled_shared_blocks(monkeypatch):
    prompts = shared_prefix_prompts(4, 17, seed=9)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    ref = tiny_engine(num_blocks=96, enable_prefix_caching=False).generate(prompts, params)
    engine = tiny_engine(num_blocks=96)
    run, calls = engine.runner.run, {"n": 0}

    def fails_first(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected forward failure")
        return run(step)

    monkeypatch.setattr(engine.runner, "run", fails_first)
    ids = [engine.add_request(p, params) for p in prompts]
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.abort(ids[0])  # the request that was to fill the shared blocks leaves
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.output_ids for o in engine.step() if o.finished})
    for p, i, r in list(zip(prompts, ids, ref))[1:]:
        assert_same_greedy(0, p, done[i], r.output_ids)
    assert_accounted(engine.blocks, [])
