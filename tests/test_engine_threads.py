"""The Engine driven as a server drives it: add_request / abort from other threads while one
thread steps; a second stepper refused. Afterwards every request is reported exactly once as
finished and every block is free."""

from __future__ import annotations

import random
import threading
import time

import pytest
from test_engine import VOCAB, prompts_of, single_thread, tiny_llama
from test_engine_faults import GREEDY, assert_reported_once, drain

from fastdecode import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

TIMEOUT = 30.0  # seconds; only reached when something deadlocks


def run_in_thread(fn) -> None:
    """Run ``fn`` in another thread; fail (instead of hanging) if it does not return."""
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{fn.__name__} blocked"
    if errors:
        raise errors[0]


class BlockingForward:
    """Holds the runner's forward pass until released, to act while a step is inside it."""

    def __init__(self, engine: Engine):
        self.forward = engine.runner.paged.forward
        self.inside, self.release = threading.Event(), threading.Event()
        engine.runner.paged.forward = self

    def __call__(self, *args, **kwargs):
        self.inside.set()
        assert self.release.wait(TIMEOUT)
        return self.forward(*args, **kwargs)


def test_add_abort_and_refused_steps_while_a_step_is_inside_the_forward():
    engine = Engine(tiny_llama(0), num_blocks=64)
    a, b = (engine.add_request(p, GREEDY) for p in prompts_of([20, 5], seed=1))
    collected = {o.request_id: [o] for o in engine.step()}
    blocking = BlockingForward(engine)
    stepped: list = []
    stepper = threading.Thread(target=lambda: stepped.append(engine.step()))
    stepper.start()
    try:
        assert blocking.inside.wait(TIMEOUT)
        added: list[str] = []

        def meanwhile():
            engine.abort(a)
            added.append(engine.add_request([7, 8, 9], GREEDY))
            with pytest.raises(RuntimeError, match="already running"):
                engine.step()
            with pytest.raises(RuntimeError, match="already running"):
                engine.generate([[5, 6]])
            with pytest.raises(RuntimeError, match="already running"):
                next(engine.stream([5, 6]))
            assert engine.stats["free_blocks"] == 63  # a's 2 blocks back at once; b holds 1

        run_in_thread(meanwhile)
    finally:
        blocking.release.set()
        stepper.join(TIMEOUT)
    engine.runner.paged.forward = blocking.forward
    for out in stepped[0]:
        collected.setdefault(out.request_id, []).append(out)
    finals = assert_reported_once(drain(engine, collected), engine)
    assert sorted(finals) == sorted([a, b, added[0]])  # the refused drivers queued nothing
    assert finals[a].finish_reason == "abort" and len(finals[a].output_ids) == 1
    assert finals[b].finish_reason == finals[added[0]].finish_reason == "length"


def test_a_step_from_inside_a_step_is_refused():
    engine = Engine(tiny_llama(0), num_blocks=16)
    forward = engine.runner.paged.forward
    refusals = []

    def reentrant(*args, **kwargs):
        with pytest.raises(RuntimeError, match="already running"):
            engine.step()
        refusals.append(1)
        return forward(*args, **kwargs)

    engine.runner.paged.forward = reentrant
    out = engine.generate([[4, 5]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert refusals == [1, 1, 1] and out.finish_reason == "length"


def test_producers_add_and_abort_while_one_thread_steps():
    engine = Engine(tiny_llama(1), block_size=4, num_blocks=48, max_num_seqs=16,
                    max_batch_tokens=64)
    collected: dict = {}
    aborted: set[str] = set()
    producers_done = threading.Event()

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[str] = []
        for _ in range(40):
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
            mine.append(engine.add_request(prompt, SamplingParams(
                max_new_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 1.0]))))
            if rng.random() < 0.3:
                victim = rng.choice(mine)
                aborted.add(victim)
                engine.abort(victim)
            time.sleep(rng.random() * 0.002)

    def step_loop() -> None:
        while not (producers_done.is_set() and not engine.has_unfinished()):
            for out in engine.step():
                collected.setdefault(out.request_id, []).append(out)

    stepper = threading.Thread(target=step_loop)
    stepper.start()
    producers = [threading.Thread(target=produce, args=(seed,)) for seed in range(4)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(TIMEOUT)
    producers_done.set()
    stepper.join(TIMEOUT)
    assert not stepper.is_alive()
    finals = assert_reported_once(collected, engine)
    assert len(finals) == 160
    assert {r for r, o in finals.items() if o.finish_reason == "abort"} <= aborted
    assert all(o.finish_reason in ("stop", "length", "abort") for o in finals.values())
    assert engine.stats["preemptions"] >= 0 and engine.stats["running"] == 0


def test_two_threads_stepping_at_once():
    """Each step() either runs alone or is refused; the scheduler stays consistent."""
    engine = Engine(tiny_llama(2), num_blocks=64)
    forward = engine.runner.paged.forward

    def slow(*args, **kwargs):
        time.sleep(0.002)  # let the other thread try while this one is inside
        return forward(*args, **kwargs)

    engine.runner.paged.forward = slow
    ids = [engine.add_request(p, GREEDY) for p in prompts_of([3, 9, 14, 6] * 3, seed=3)]
    collected: dict = {}
    refusals = []
    lock = threading.Lock()

    def step_loop() -> None:
        while engine.has_unfinished():
            try:
                outs = engine.step()
            except RuntimeError as exc:
                assert "already running" in str(exc)
                refusals.append(1)
                continue
            with lock:
                for out in outs:
                    collected.setdefault(out.request_id, []).append(out)

    threads = [threading.Thread(target=step_loop) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(collected) == sorted(ids) and refusals
    for outs in collected.values():  # the two threads may record their outputs in any order
        (final,) = [o for o in outs if o.finished]
        assert sorted(t for o in outs for t in o.new_ids) == sorted(final.output_ids)
        assert len(final.output_ids) == 6
    assert engine.stats["free_blocks"] == 64 and not engine.has_unfinished()
