"""Scheduler: FIFO admission, chunked prefill under the token budget mixed with decodes,
max_num_seqs, newest-first preemption with recomputation, abort. Pure Python: the model is
replaced by a step that appends a made-up token to every sequence that reached its end."""

from __future__ import annotations

import random

import pytest

from fastdecode.engine.block_manager import BlockManager
from fastdecode.engine.params import SamplingParams
from fastdecode.engine.scheduler import ScheduledBatch, Scheduler
from fastdecode.engine.sequence import Sequence, Status


def make(arrival: int, prompt_len: int, max_new: int = 4) -> Sequence:
    return Sequence(f"r{arrival}", list(range(1, prompt_len + 1)),
                    SamplingParams(max_new_tokens=max_new), arrival, frozenset())


def run_step(sched: Scheduler, batch: ScheduledBatch) -> list[Sequence]:
    """What the engine does after the forward pass; returns the sequences that finished."""
    done = []
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
        samples = batch.samples(i)
        seq.num_computed += n
        if samples:
            seq.token_ids.append(1000 + seq.num_tokens)
            if seq.num_generated == seq.params.max_new_tokens:
                sched.finish(seq, "length")
                done.append(seq)
    return done


def new(num_blocks=64, block_size=4, max_num_seqs=8, max_batch_tokens=32, watermark=0.0):
    bm = BlockManager(num_blocks, block_size, watermark)
    return bm, Scheduler(bm, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens)


def test_long_prompt_is_prefilled_in_chunks_then_decoded():
    bm, sched = new(max_batch_tokens=10)
    seq = make(0, 23)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        b = sched.schedule()
        chunks.append(b.num_new[0])
        assert not b.samples(0) or seq.num_computed + b.num_new[0] == 23
        run_step(sched, b)
    assert chunks == [10, 10, 3] and seq.num_generated == 1
    b = sched.schedule()
    assert b.num_new == [1] and b.num_decode_tokens == 1 and b.num_prefill_tokens == 0


def test_decodes_come_first_then_fifo_prompt_chunks_within_budget():
    bm, sched = new(max_batch_tokens=16)
    a, b_, c = make(0, 5), make(1, 9), make(2, 30)
    for s in (a, b_, c):
        sched.add(s)
    first = sched.schedule()
    assert first.seqs == [a, b_, c] and first.num_new == [5, 9, 2]  # c gets what is left
    run_step(sched, first)
    second = sched.schedule()
    # a and b decode (first, oldest first), c's prompt continues with the remaining budget
    assert second.seqs == [a, b_, c] and second.num_new == [1, 1, 14]
    assert second.num_decode_tokens == 2 and second.num_prefill_tokens == 14


def test_max_num_seqs_limits_admission():
    bm, sched = new(max_num_seqs=3, max_batch_tokens=100)
    seqs = [make(i, 2) for i in range(5)]
    for s in seqs:
        sched.add(s)
    b = sched.schedule()
    assert b.seqs == seqs[:3] and list(sched.waiting) == seqs[3:]


def test_max_num_seqs_is_capped_by_the_token_budget():
    _, sched = new(max_num_seqs=50, max_batch_tokens=7)
    assert sched.max_num_seqs == 7


def test_head_of_queue_is_never_overtaken():
    bm, sched = new(num_blocks=6, block_size=4, max_batch_tokens=64)
    big, small = make(0, 40), make(1, 2)
    sched.add(big)
    sched.add(small)
    b = sched.schedule()
    # only 24 tokens fit in the idle cache: big starts with them, small waits behind it
    assert b.seqs == [big] and b.num_new == [24] and list(sched.waiting) == [small]


def test_a_chunk_waits_for_blocks_while_others_run():
    bm, sched = new(num_blocks=6, block_size=4, max_batch_tokens=64)
    first, second = make(0, 12, max_new=2), make(1, 20)
    sched.add(first)
    sched.add(second)
    b = sched.schedule()
    assert b.seqs == [first] and b.num_new == [12]  # second's 20 tokens do not fit beside it
    run_step(sched, b)
    run_step(sched, sched.schedule())
    assert first.status is Status.FINISHED
    b = sched.schedule()
    assert b.seqs == [second] and b.num_new == [20]


def test_newest_running_request_is_preempted_and_recomputed():
    bm, sched = new(num_blocks=6, block_size=4, max_batch_tokens=64)
    old, young = make(0, 11, max_new=8), make(1, 11, max_new=8)
    sched.add(old)
    sched.add(young)
    run_step(sched, sched.schedule())  # 3 + 3 blocks: the cache is full
    assert bm.num_free_blocks == 0
    run_step(sched, sched.schedule())  # both write position 11 into their third block
    b = sched.schedule()  # position 12 needs a fourth block for each
    assert sched.num_preemptions == 1 and b.seqs == [old]
    assert young.status is Status.WAITING and sched.waiting[0] is young
    assert young.block_table == [] and young.num_computed == 0
    assert young.num_pending == 11 + 2  # prompt and generated tokens are recomputed
    assert b.num_decode_tokens == 1
    run_step(sched, b)
    while old.status is not Status.FINISHED:
        run_step(sched, sched.schedule())
    b = sched.schedule()  # blocks are back: the young request is recomputed in one chunk
    assert b.seqs == [young] and b.num_new == [13] and b.num_prefill_tokens == 13


def test_a_request_preempts_itself_when_it_is_the_newest():
    bm, sched = new(num_blocks=5, block_size=4, max_batch_tokens=64)
    old, young = make(0, 12, max_new=8), make(1, 8, max_new=8)
    sched.add(old)
    sched.add(young)
    run_step(sched, sched.schedule())  # old 3 blocks, young 2
    b = sched.schedule()
    # old needs a 4th block: young (the newest) goes; young itself is never scheduled
    assert b.seqs == [old] and sched.num_preemptions == 1 and sched.waiting[0] is young


def test_abort_frees_blocks_at_once():
    bm, sched = new()
    a, b_ = make(0, 9), make(1, 9)
    sched.add(a)
    sched.add(b_)
    run_step(sched, sched.schedule())
    sched.finish(a, "abort")
    assert a.finish_reason == "abort" and a.block_table == []
    assert bm.num_free_blocks == 64 - len(b_.block_table)
    sched.finish(b_, "abort")
    assert not sched.has_unfinished() and bm.num_free_blocks == 64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_finishes_everything_without_leaks(seed):
    rng = random.Random(seed)
    bm, sched = new(num_blocks=rng.choice([12, 20, 40]), block_size=rng.choice([1, 3, 4, 16]),
                    max_num_seqs=rng.choice([2, 5, 16]), max_batch_tokens=rng.choice([7, 32]))
    capacity = bm.num_blocks * bm.block_size
    pending = []
    for i in range(60):
        max_new = rng.randint(1, 12)
        prompt = rng.randint(1, max(1, min(40, capacity - max_new)))
        pending.append(make(i, prompt, max_new))
    finished, steps = [], 0
    while pending or sched.has_unfinished():
        if pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        b = sched.schedule()
        assert sum(b.num_new) <= sched.max_batch_tokens
        assert len(sched.running) <= sched.max_num_seqs
        assert len(set(map(id, b.seqs))) == len(b.seqs)
        for s in sched.running:
            assert len(s.block_table) * bm.block_size >= s.num_computed
        if sched.running and rng.random() < 0.05:
            victim = rng.choice(sched.running)
            sched.finish(victim, "abort")
            finished.append(victim)
            b = ScheduledBatch([s for s in b.seqs if s is not victim],
                               [n for s, n in zip(b.seqs, b.num_new) if s is not victim])
        finished += run_step(sched, b)
        steps += 1
        assert steps < 5000
    assert len(finished) == 60 and bm.num_free_blocks == bm.num_blocks
    for s in finished:
        if s.finish_reason == "length":
            assert s.num_generated == s.params.max_new_tokens
