"""Engine request handling: validation at add_request, per-request sampling parameters,
finish reasons (stop / length / error), seeds, cache sizing."""

from __future__ import annotations

import pytest
import torch
from test_engine import EOS, VOCAB, greedy_reference, prompts_of, single_thread, tiny_llama

from fastdecode import Engine, SamplingParams
from fastdecode.engine.block_manager import cdiv

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


@pytest.mark.parametrize("field,value,allowed", [
    ("max_new_tokens", 0, ">= 1"), ("min_new_tokens", 17, "[0, max_new_tokens=16]"),
    ("temperature", -0.5, ">= 0"), ("temperature", float("nan"), ">= 0"),
    ("top_k", 2.5, "integer"), ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"),
    ("min_p", -0.1, "[0, 1]"), ("repetition_penalty", 0.0, "> 0"), ("seed", -3, "[0, 2**63)"),
    ("stop_token_ids", [4, -1], "token ids >= 0"), ("ignore_eos", 1, "bool")])
def test_sampling_params_name_the_field_and_the_range(field, value, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert f"SamplingParams.{field}" in str(e.value) and allowed in str(e.value)


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_llama(0, max_position_embeddings=64), block_size=4, num_blocks=40)


@pytest.mark.parametrize("prompt,params,match", [
    ([], None, "empty"),
    ([5, VOCAB], None, rf"\[0, {VOCAB}\)"),
    ([5, -1], None, rf"\[0, {VOCAB}\)"),
    ([5, 2.0], None, rf"\[0, {VOCAB}\)"),
    (list(range(3, 68)), None, "max_position_embeddings=64"),
    (torch.ones(2, 3, dtype=torch.long), None, "1-D integer tensor"),
])
def test_bad_requests_are_rejected_without_disturbing_others(engine, prompt, params, match):
    good = engine.add_request([7, 8, 9], SamplingParams(max_new_tokens=3, temperature=0))
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params)
    outs = engine.generate([[7, 8, 9]], SamplingParams(max_new_tokens=3, temperature=0))
    while engine.has_unfinished():
        engine.step()
    assert outs[0].finish_reason in ("length", "stop")
    assert engine.stats["free_blocks"] == 40 and good not in engine._requests


def test_request_larger_than_the_whole_cache_is_rejected():
    engine = Engine(tiny_llama(0), block_size=4, num_blocks=5)
    engine.add_request([5] * 12, SamplingParams(max_new_tokens=9))  # 20 tokens cached: fits
    with pytest.raises(ValueError, match="need 6 KV blocks, the cache has 5"):
        engine.add_request([5] * 12, SamplingParams(max_new_tokens=10))


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request([5, 6], request_id="x")
    with pytest.raises(ValueError, match="'x' is already in use"):
        engine.add_request([5, 6], request_id="x")
    engine.abort("x")
    engine.step()
    assert engine.add_request([5, 6], request_id="x") == "x"  # free again once finished
    engine.abort("x")
    engine.step()


def test_generate_is_all_or_nothing(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[5, 6], []])
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[5]], [SamplingParams(), SamplingParams()])


def test_context_end_finishes_with_length(engine):
    out = engine.generate([list(range(3, 63))], SamplingParams(max_new_tokens=10,
                                                               ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.output_ids) == 4  # 60 + 4 = 64 positions


def test_stop_ids_min_new_tokens_and_ignore_eos():
    prompt = prompts_of([10], seed=8)[0]
    ref = greedy_reference(6, [prompt], 8, eos_token_id=None)[0]
    first = ref[0]
    model = tiny_llama(6)
    engine = Engine(model, num_blocks=16)
    greedy = dict(max_new_tokens=8, temperature=0)
    out = engine.generate([prompt], SamplingParams(**greedy, stop_token_ids=[first]))[0]
    assert out.output_ids == [first] and out.finish_reason == "stop"
    out = engine.generate([prompt], SamplingParams(**greedy, stop_token_ids=[first],
                                                   min_new_tokens=3))[0]
    assert first not in out.output_ids[:3] and out.finish_reason in ("stop", "length")
    if out.finish_reason == "stop":
        assert out.output_ids[-1] == first and len(out.output_ids) > 3
    # the same token as EOS: it stops the request unless ignore_eos
    engine.eos_ids = frozenset([first])
    assert engine.generate([prompt], SamplingParams(**greedy))[0].output_ids == [first]
    out = engine.generate([prompt], SamplingParams(**greedy, ignore_eos=True))[0]
    assert out.output_ids == ref and out.finish_reason == "length"


def test_seeded_sampling_does_not_depend_on_batchmates():
    prompt = prompts_of([13], seed=9)[0]
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.9, seed=1234,
                            ignore_eos=True)
    engine = Engine(tiny_llama(7), num_blocks=64)
    alone = engine.generate([prompt], params)[0].output_ids
    mates = prompts_of([5, 31, 2], seed=10)
    together = engine.generate(mates[:2] + [prompt] + mates[2:],
                               [SamplingParams(max_new_tokens=12, temperature=0.8)] * 2
                               + [params] + [SamplingParams(max_new_tokens=3, seed=1)])[2]
    assert together.output_ids == alone
    other_seed = engine.generate([prompt], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other_seed[0].output_ids != alone  # 12 draws from ~97 tokens: equal by chance ~never


def test_nan_logits_fail_only_that_request():
    engine = Engine(tiny_llama(8), num_blocks=32)
    forward = engine.runner.paged.forward

    calls = []

    def poisoned(input_ids, positions, ctx):
        logits = forward(input_ids, positions, ctx).clone()
        if not calls:
            logits[0] = float("nan")  # the first request's first token
        calls.append(ctx.num_seqs)
        return logits

    engine.runner.paged.forward = poisoned
    outs = engine.generate(prompts_of([6, 9], seed=11),
                           SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))
    assert outs[0].finish_reason == "error" and outs[0].output_ids == []
    assert outs[1].finish_reason == "length" and len(outs[1].output_ids) == 4
    assert calls[0] == 2 and engine.stats["free_blocks"] == 32


def test_default_cache_size_is_bounded_and_usable(capsys):
    model = tiny_llama(9)
    engine = Engine(model, max_num_seqs=8)
    assert 1 <= engine.stats["num_blocks"] <= 8 * cdiv(model.config.max_position_embeddings, 16)
    outs = engine.generate(prompts_of([3, 40], seed=12), SamplingParams(max_new_tokens=4),
                           progress=True)
    assert all(o.finished for o in outs)
    assert "requests" in capsys.readouterr().err  # the progress bar
    assert EOS in engine.eos_ids
