"""AsyncEngine: asyncio streams over an engine loop thread; the consumer leaving aborts its
request, timeouts, the bounded queue, step failures, stats."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from fastdecode import AsyncEngine, Engine, SamplingParams
from fastdecode.serving import EngineStepError, QueueFullError, RequestTimeoutError
from test_engine import prompts_of, single_thread, tiny_llama  # noqa: F401 (autouse)

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture
def engine():
    with AsyncEngine(tiny_llama(0), block_size=4, num_blocks=64, max_num_seqs=4,
                     max_queued=2) as eng:
        yield eng


async def collect(eng: AsyncEngine, prompt, params=GREEDY, **kw):
    outs = [out async for out in eng.generate(prompt, params, **kw)]
    return outs


def wait_until(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def all_blocks_free(eng: AsyncEngine) -> bool:
    s = eng.stats
    return s["free_blocks"] == s["num_blocks"] and s["in_flight"] == 0


def test_concurrent_streams_match_the_engine(engine):
    prompts = prompts_of([3, 17, 9, 30, 5])  # more than max_num_seqs: some wait
    ref = Engine(tiny_llama(0), block_size=4, num_blocks=64).generate(prompts, GREEDY)

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    results = asyncio.run(main())
    for outs, r in zip(results, ref):
        assert outs[-1].finished and sum(1 for o in outs if o.finished) == 1
        assert [t for o in outs for t in o.new_ids] == outs[-1].output_ids == r.output_ids
    wait_until(lambda: all_blocks_free(engine))
    stats = engine.stats
    assert stats["requests"] == 5 and stats["tokens_per_s"] > 0


def test_consumer_leaving_aborts_the_request_and_frees_its_blocks(engine):
    params = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        gen = engine.generate(prompts_of([20])[0], params)
        async with contextlib.aclosing(gen):
            async for out in gen:
                if len(out.output_ids) >= 2:
                    assert engine.stats["running"] == 1
                    break

    asyncio.run(main())
    wait_until(lambda: all_blocks_free(engine) and engine.stats["running"] == 0)
    assert engine.stats["generated_tokens"] < 200


def test_cancelled_consumer_task_aborts_its_request(engine):
    params = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        task = asyncio.create_task(collect(engine, prompts_of([12])[0], params))
        while engine.stats["generated_tokens"] < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until(lambda: all_blocks_free(engine))


def test_timeout_aborts_the_request(engine):
    params = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    with pytest.raises(RequestTimeoutError, match="timed out after 0.05 s"):
        asyncio.run(collect(engine, prompts_of([12])[0], params, timeout=0.05))
    wait_until(lambda: all_blocks_free(engine))
    assert engine.stats["timeouts"] == 1


def test_full_queue_refuses_at_once(engine):
    params = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    limit = engine.max_in_flight
    assert limit == 4 + 2

    async def main():
        gens = [engine.generate(p, params) for p in prompts_of([5] * limit)]
        assert engine.stats["in_flight"] == limit
        with pytest.raises(QueueFullError, match="too many requests in flight"):
            engine.generate([5, 6], params)
        for g in gens:
            await anext(g)  # started, then closed: aborted
            await g.aclose()

    asyncio.run(main())
    wait_until(lambda: all_blocks_free(engine))
    assert engine.stats["rejected"] == 1


def test_bad_request_raises_at_once(engine):
    with pytest.raises(ValueError, match="prompt_ids"):
        asyncio.run(collect(engine, []))
    assert engine.stats["in_flight"] == 0


def test_a_failed_step_fails_the_requests_in_flight_and_the_loop_goes_on(engine, monkeypatch):
    run = engine.engine.runner.run
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected forward failure")
        return run(step)

    monkeypatch.setattr(engine.engine.runner, "run", flaky)
    with pytest.raises(EngineStepError, match="injected forward failure"):
        asyncio.run(collect(engine, prompts_of([6])[0]))
    outs = asyncio.run(collect(engine, prompts_of([6])[0]))
    assert outs[-1].finished and outs[-1].finish_reason in ("stop", "length")
    assert engine.is_healthy and engine.stats["step_failures"] == 1
    wait_until(lambda: all_blocks_free(engine))


def test_closed_engine_refuses_requests():
    eng = AsyncEngine(tiny_llama(0), block_size=4, num_blocks=16)
    eng.close()
    assert not eng.is_healthy
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(collect(eng, [5, 6]))


@pytest.mark.parametrize("kwargs", [dict(max_queued=-1), dict(request_timeout=0)])
def test_invalid_options(kwargs):
    with pytest.raises(ValueError):
        AsyncEngine(tiny_llama(0), block_size=4, num_blocks=16, **kwargs)


def test_a_request_never_iterated_still_leaves_the_in_flight_count(engine):
    async def main():
        engine.generate(prompts_of([4])[0], GREEDY)  # queued, its outputs never read
        while engine.stats["in_flight"]:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    wait_until(lambda: all_blocks_free(engine))
    assert engine.stats["requests"] == 1
