"""200 requests with random lengths and parameters submitted while the engine runs, random
aborts, a cache small enough to preempt: every request ends with the right finish reason, the
streamed pieces add up, and every block comes back."""

from __future__ import annotations

import random

import pytest

from test_engine import EOS, VOCAB, single_thread, tiny_llama

from fastdecode import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


def random_params(rng: random.Random) -> SamplingParams:
    max_new = rng.randint(1, 16)
    return SamplingParams(
        max_new_tokens=max_new, min_new_tokens=rng.randint(0, min(2, max_new)),
        temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 5, 50]),
        top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.1]),
        repetition_penalty=rng.choice([1.0, 1.2]),
        seed=rng.choice([None, rng.randrange(2**31)]),
        stop_token_ids=rng.choice([None, rng.sample(range(VOCAB), 4)]),
        ignore_eos=rng.random() < 0.3)


def test_random_workload_with_aborts_and_preemptions():
    rng = random.Random(0)
    engine = Engine(tiny_llama(10), block_size=4, num_blocks=40, max_num_seqs=12,
                    max_batch_tokens=48)
    free_at_start = engine.stats["free_blocks"]
    params, streamed, final, aborted = {}, {}, {}, set()
    live: list[str] = []
    submitted = 0
    while submitted < 200 or engine.has_unfinished():
        for _ in range(min(rng.randint(0, 3), 200 - submitted)):
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]
            p = random_params(rng)
            rid = engine.add_request(prompt, p)
            params[rid] = p
            live.append(rid)
            submitted += 1
        if live and rng.random() < 0.08:
            rid = live.pop(rng.randrange(len(live)))
            engine.abort(rid)
            aborted.add(rid)
        for out in engine.step():
            assert out.request_id not in final, "output after the request finished"
            streamed.setdefault(out.request_id, []).extend(out.new_ids)
            if out.finished:
                final[out.request_id] = out
                if out.request_id in live:
                    live.remove(out.request_id)
        stats = engine.stats
        assert stats["running"] <= 12 and stats["prefill_tokens"] + stats["decode_tokens"] <= 48
    assert len(final) == 200 and engine.stats["preemptions"] > 0
    reasons = {r: 0 for r in ("stop", "length", "abort")}
    for rid, out in final.items():
        p, ids = params[rid], out.output_ids
        reasons[out.finish_reason] += 1
        assert streamed.get(rid, []) == ids
        stop = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else {EOS})
        assert not stop & set(ids[:max(0, len(ids) - 1)])  # nothing ran past a stop token
        assert not stop & set(ids[:p.min_new_tokens])
        if rid in aborted:
            assert out.finish_reason == "abort" and len(ids) < p.max_new_tokens
        elif out.finish_reason == "length":
            assert len(ids) == p.max_new_tokens
        else:
            assert out.finish_reason == "stop" and ids[-1] in stop
            assert p.min_new_tokens < len(ids) <= p.max_new_tokens
    assert all(reasons.values()), reasons  # every kind of ending was exercised
    assert engine.stats["free_blocks"] == free_at_start == 40
