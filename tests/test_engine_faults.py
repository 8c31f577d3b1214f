"""Engine reliability: a poisoned request never delays another one, no output is lost, forward
faults and Ctrl-C leave the engine consistent. Every test ends with every block free and every
request reported exactly once as finished."""

from __future__ import annotations

import dataclasses
import random

import pytest
from test_engine import VOCAB, assert_same_greedy, prompts_of, single_thread, tiny_llama

from fastdecode import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


def drain(engine: Engine, collected: dict | None = None, max_steps: int = 1000) -> dict:
    """Step until nothing is left; request id -> its outputs, in order."""
    collected = {} if collected is None else collected
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return collected
        for out in engine.step():
            collected.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def assert_reported_once(collected: dict, engine: Engine, driven=()) -> dict:
    """Each request: exactly one final output, the last one, whose output_ids are the sum of the
    new_ids reported (except for ``driven`` requests: generate() / stream() took their first
    outputs).
    Every block free. Returns request id -> final output."""
    finals = {}
    for rid, outs in collected.items():
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True], rid
        if rid not in driven:
            assert [t for o in outs for t in o.new_ids] == outs[-1].output_ids, rid
        finals[rid] = outs[-1]
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]
    assert not engine.has_unfinished() and engine.stats["running"] == engine.stats["waiting"] == 0
    return finals


class ForwardFaults:
    """Wraps the runner's forward: raises ``exc`` at the listed calls (0-based), or on each
    call with probability ``rate``."""

    def __init__(self, engine: Engine, exc: BaseException, at=(), rate: float = 0.0,
                 seed: int = 0):
        self.forward, self.exc, self.at, self.rate = engine.runner.paged.forward, exc, set(at), rate
        self.rng, self.calls, self.raised = random.Random(seed), 0, 0
        engine.runner.paged.forward = self

    def __call__(self, *args, **kwargs):
        call, self.calls = self.calls, self.calls + 1
        if call in self.at or self.rng.random() < self.rate:
            self.raised += 1
            raise self.exc
        return self.forward(*args, **kwargs)


# ---------------------------------------------------------------------- poisoned requests
@pytest.mark.parametrize("field,value,allowed", [
    ("temperature", 1e39, "float32's normal range"),
    ("temperature", 1e-39, "float32's normal range"),
    ("repetition_penalty", 1e39, "float32's normal range"),
    ("repetition_penalty", 1e-40, "float32's normal range"),
    ("top_k", float("inf"), "an integer"),
    ("seed", 2**64, r"\[0, 2\*\*63\)"),
])
def test_values_beyond_float32_or_int64_are_refused_at_construction(field, value, allowed):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be .*{allowed}"):
        SamplingParams(**{field: value})


def test_stop_ids_outside_the_vocabulary_are_refused_at_add_request():
    engine = Engine(tiny_llama(0), num_blocks=32)
    params = SamplingParams(max_new_tokens=4, min_new_tokens=2, stop_token_ids=[5, 10**6])
    with pytest.raises(ValueError, match=rf"stop_token_ids must be token ids in \[0, {VOCAB}\)"):
        engine.add_request([5, 6, 7], params)
    assert not engine.has_unfinished()


def test_fields_cannot_change_after_construction():
    params = SamplingParams(stop_token_ids=[3, 4])
    for field in dataclasses.fields(SamplingParams):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(params, field.name, getattr(params, field.name))
    assert params.stop_token_ids == (3, 4)  # a tuple: no append either
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        dataclasses.replace(params, top_p=2.0)  # derived copies are validated too


def test_eos_ids_outside_the_vocabulary_are_ignored():
    """A config's EOS list may name ids the model cannot emit; masking them before
    min_new_tokens must not index past the logits."""
    model = tiny_llama(0)
    model.generation_config.eos_token_id = [2, 10**6]
    engine = Engine(model, num_blocks=32)
    assert engine.eos_ids == frozenset([2])
    out = engine.generate([[5, 6]], SamplingParams(max_new_tokens=4, min_new_tokens=3))[0]
    assert out.finish_reason in ("stop", "length") and len(out.output_ids) >= 3


def test_top_k_beyond_int64_means_off():
    engine = Engine(tiny_llama(0), num_blocks=32)
    prompts = prompts_of([5, 9], seed=1)
    seeded = dict(max_new_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    huge = engine.generate(prompts, [SamplingParams(**seeded, top_k=2**64),
                                     SamplingParams(**seeded, top_k=-2**70)])
    off = engine.generate(prompts, SamplingParams(**seeded, top_k=0))
    assert [o.output_ids for o in huge] == [o.output_ids for o in off]


# Values the table refuses, forced into a request after add_request: whatever the sampler or the
# bookkeeping then does with them must end that request alone.
POISONS = {
    "temperature=1e39": dict(temperature=1e39),
    "temperature=nan": dict(temperature=float("nan")),
    "repetition_penalty=1e39": dict(repetition_penalty=1e39),
    "top_k=2.5": dict(top_k=2.5),
    "top_p=0": dict(top_p=0.0),
    "max_new_tokens=None": dict(max_new_tokens=None),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_poisoned_request_ends_alone(poison):
    prompts = prompts_of([7, 12, 4, 9], seed=2)
    alone = Engine(tiny_llama(1), num_blocks=64).generate(prompts[:3], GREEDY)
    engine = Engine(tiny_llama(1), num_blocks=64)
    good = [engine.add_request(p, GREEDY) for p in prompts[:3]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    bad = engine.add_request(prompts[3], params)
    for name, value in POISONS[poison].items():
        object.__setattr__(params, name, value)  # past the frozen dataclass, as a bug would
    finals = assert_reported_once(drain(engine), engine)
    assert finals[bad].finish_reason == "error" and repr(bad) in finals[bad].error
    for rid, prompt, ref in zip(good, prompts, alone):
        assert finals[rid].finish_reason == "length" and finals[rid].error is None
        assert_same_greedy(1, prompt, finals[rid].output_ids, ref.output_ids)


def test_a_failure_in_one_request_bookkeeping_ends_it_alone():
    engine = Engine(tiny_llama(2), num_blocks=64)
    ids = [engine.add_request(p, GREEDY) for p in prompts_of([5, 8, 3], seed=3)]
    finish_reason = engine.scheduler._finish_reason

    def failing(seq, tok):
        if seq.request_id == ids[1] and seq.num_generated == 2:
            raise KeyError("boom")
        return finish_reason(seq, tok)

    engine.scheduler._finish_reason = failing
    finals = assert_reported_once(drain(engine), engine)
    assert finals[ids[1]].finish_reason == "error" and len(finals[ids[1]].output_ids) == 2
    assert repr(ids[1]) in finals[ids[1]].error and "KeyError" in finals[ids[1]].error
    assert [finals[i].finish_reason for i in (ids[0], ids[2])] == ["length", "length"]


def test_a_failing_sampling_call_is_retried_row_by_row():
    """Rows that fail only together (a batch-level fault) still draw; seeded rows draw the
    same tokens as in the batched call."""
    engine = Engine(tiny_llama(3), num_blocks=64)
    sample = engine.runner._sample
    batched_failures = []

    def flaky(logits, seqs):
        if len(seqs) > 1 and len(batched_failures) < 3:
            batched_failures.append(len(seqs))
            raise RuntimeError("transient")
        return sample(logits, seqs)

    prompts = prompts_of([6, 10, 3], seed=4)
    params = SamplingParams(max_new_tokens=5, temperature=0.9, seed=11, ignore_eos=True)
    ref = Engine(tiny_llama(3), num_blocks=64).generate(prompts, params)
    engine.runner._sample = flaky
    outs = engine.generate(prompts, params)
    assert batched_failures == [3, 3, 3]
    assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
    assert all(o.finish_reason == "length" for o in outs)


# ---------------------------------------------------------------------- lost outputs
def test_abort_then_a_failing_step_still_reports_the_abort():
    engine = Engine(tiny_llama(4), num_blocks=32)
    a = engine.add_request([5, 6, 7], GREEDY)
    b = engine.add_request([8, 9], GREEDY)
    collected = {o.request_id: [o] for o in engine.step()}
    engine.abort(a)
    ForwardFaults(engine, RuntimeError("device lost"), at=[0])
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    drain(engine, collected)
    assert collected[a][1].finish_reason == "abort" and len(collected[a]) == 2
    finals = assert_reported_once(collected, engine)
    assert finals[b].finish_reason == "length"


@pytest.mark.parametrize("driver", ["generate", "stream"])
def test_requests_queued_before_generate_or_stream_get_their_final_output(driver):
    engine = Engine(tiny_llama(5), num_blocks=64)
    early = [engine.add_request(p, SamplingParams(max_new_tokens=3, temperature=0,
                                                  ignore_eos=True))
             for p in prompts_of([4, 6], seed=5)]
    long = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    if driver == "generate":
        mine = engine.generate(prompts_of([5], seed=6), long)
    else:
        mine = list(engine.stream(prompts_of([5], seed=6)[0], long))
    assert mine[-1].finished and len(mine[-1].output_ids) == 8
    assert engine.has_unfinished()  # the early requests' outputs are waiting for step()
    collected = drain(engine)
    assert sorted(collected) == sorted(early)  # nothing of the driver's own request
    finals = assert_reported_once(collected, engine)
    assert all(len(finals[r].output_ids) == 3 for r in early)


def test_a_failing_generate_leaves_every_output_to_step():
    """A forward fault inside generate: its finished requests' finals and its unfinished
    requests' aborts come from step(), once each; a request queued before runs on."""
    engine = Engine(tiny_llama(6), num_blocks=64)
    before = engine.add_request([9, 8, 7], SamplingParams(max_new_tokens=12, temperature=0,
                                                          ignore_eos=True))
    collected = {o.request_id: [o] for o in engine.step()}
    ForwardFaults(engine, RuntimeError("fault"), at=[4])
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (2, 9)]
    with pytest.raises(RuntimeError, match="fault"):
        engine.generate(prompts_of([3, 5], seed=7), params)
    drain(engine, collected)
    finals = assert_reported_once(collected, engine, driven=set(collected) - {before})
    mine = sorted((len(o.output_ids), o.finish_reason) for r, o in finals.items() if r != before)
    assert mine == [(2, "length"), (4, "abort")]
    assert finals[before].finish_reason == "length" and len(finals[before].output_ids) == 12


# ---------------------------------------------------------------------- forward faults
def test_one_off_forward_fault_changes_nothing():
    prompts = prompts_of([11, 3, 20], seed=8)
    ref = Engine(tiny_llama(7), num_blocks=64).generate(prompts, GREEDY)
    engine = Engine(tiny_llama(7), num_blocks=64)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    faults = ForwardFaults(engine, RuntimeError("fault"), at=[2])
    collected: dict = {}
    with pytest.raises(RuntimeError):
        for _ in range(3):
            drain(engine, collected)
    finals = assert_reported_once(drain(engine, collected), engine)
    assert faults.raised == 1
    assert [finals[r].output_ids for r in ids] == [o.output_ids for o in ref]


def test_random_forward_faults_with_preemption_and_aborts():
    rng = random.Random(9)
    engine = Engine(tiny_llama(8), block_size=4, num_blocks=30, max_batch_tokens=40)
    faults = ForwardFaults(engine, RuntimeError("fault"), rate=0.25, seed=1)
    params, aborted, collected = {}, set(), {}
    for step in range(2000):
        if len(params) < 60 and rng.random() < 0.5:
            p = SamplingParams(max_new_tokens=rng.randint(1, 10), temperature=0,
                               ignore_eos=True)
            params[engine.add_request(prompts_of([rng.randint(1, 30)], seed=step)[0], p)] = p
        if params and rng.random() < 0.05:
            rid = rng.choice(list(params))
            engine.abort(rid)
            aborted.add(rid)
        try:
            for out in engine.step():
                collected.setdefault(out.request_id, []).append(out)
        except RuntimeError:
            pass
        if len(params) == 60 and not engine.has_unfinished():
            break
    finals = assert_reported_once(collected, engine)
    assert len(finals) == 60 and faults.raised > 10 and engine.stats["preemptions"] > 0
    for rid, out in finals.items():
        if out.finish_reason != "abort":
            assert out.finish_reason == "length"
            assert len(out.output_ids) == params[rid].max_new_tokens
        else:
            assert rid in aborted


# ---------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("at_call", [0, 3])
def test_ctrl_c_in_generate_aborts_its_requests(at_call):
    engine = Engine(tiny_llama(9), num_blocks=64)
    before = engine.add_request([4, 5, 6], GREEDY)
    ForwardFaults(engine, KeyboardInterrupt(), at=[at_call])
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts_of([7, 30], seed=10), SamplingParams(max_new_tokens=50,
                                                                     ignore_eos=True))
    assert engine.stats["running"] + engine.stats["waiting"] <= 1  # only `before` is left
    collected = drain(engine)
    finals = assert_reported_once(collected, engine, driven=set(collected) - {before})
    assert sorted(o.finish_reason for o in finals.values()) == ["abort", "abort", "length"]
    assert finals[before].finish_reason == "length"


def test_ctrl_c_in_stream_aborts_its_request():
    engine = Engine(tiny_llama(9), num_blocks=64)
    ForwardFaults(engine, KeyboardInterrupt(), at=[2])
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for out in engine.stream([5, 6, 7], SamplingParams(max_new_tokens=20, ignore_eos=True)):
            pieces.append(out)
    assert len(pieces) == 2 and engine.stats["free_blocks"] == 64
    collected = drain(engine)
    (final,) = assert_reported_once(collected, engine, driven=set(collected)).values()
    assert final.finish_reason == "abort" and final.new_ids == []  # the 2 tokens were streamed
    assert final.output_ids == [t for p in pieces for t in p.new_ids]
