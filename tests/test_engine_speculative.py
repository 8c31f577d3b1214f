"""Speculative decoding per request in the Engine (prompt lookup, a draft model): greedy output
token for token the Engine's own without it (and fastdecode.generate's), mixed with plain
requests, under preemption, prefix-cache hits and abort; sampled output with the target's
distribution (seeded: the same tokens); stop ids, EOS and max_new_tokens exact when drafts
reach past them; rejected drafts' blocks given back; the draft model's cache kept in step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fastdecode
from _spec_helpers import echo_model, exact_joint, p_value
from fastdecode import Engine, SamplingParams
from fastdecode.engine import speculative
from fastdecode.engine.block_manager import BlockManager
from tiny import tiny_model


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def repetitive(n: int, vocab: int, seed: int) -> list[int]:
    """A prompt of n tokens repeating a random phrase (prompt lookup finds matches)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, vocab, (max(2, n // 3),), generator=g).tolist()
    return (phrase * (n // len(phrase) + 1))[:n]


def outputs(engine: Engine, prompts, params) -> list[list[int]]:
    return [list(o.output_ids) for o in engine.generate(prompts, params)]


def acceptance(monkeypatch) -> dict:
    """Counts draft tokens proposed and kept by the Engine's verifier."""
    seen = {"proposed": 0, "kept": 0}
    accept = speculative.accept

    def counted(drawn, drafts):
        new = accept(drawn, drafts)
        seen["proposed"] += sum(map(len, drafts))
        seen["kept"] += sum(len(n) - 1 for n in new)
        return new
    monkeypatch.setattr(speculative, "accept", counted)
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_lookup_equals_plain_engine_and_generate_mixed(family, monkeypatch):
    model = tiny_model(family)
    vocab = model.config.vocab_size
    prompts = [repetitive(n, vocab, seed) for seed, n in enumerate([13, 5, 21, 30, 9])]
    plain = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
             for n in (24, 17, 30, 9, 20)]
    mixed = [replace(p, prompt_lookup_num_tokens=k)
             for p, k in zip(plain, (4, 0, 3, 1, 0))]
    ref = outputs(Engine(model, block_size=4, num_blocks=200), prompts, plain)
    seen = acceptance(monkeypatch)
    engine = Engine(model, block_size=4, num_blocks=200)
    assert outputs(engine, prompts, mixed) == ref
    assert seen["proposed"] > 0
    assert (engine.stats["draft_tokens"], engine.stats["accepted_draft_tokens"]) == (
        seen["proposed"], seen["kept"])
    for prompt, p, want in zip(prompts, plain, ref):
        ids = torch.tensor([prompt])
        alone = fastdecode.generate(model, ids, attention_mask=torch.ones_like(ids),
                                    do_sample=False, max_new_tokens=p.max_new_tokens,
                                    eos_token_id=None, prompt_lookup_num_tokens=3)
        assert alone[0, len(prompt):].tolist() == want


def test_accepted_drafts_save_steps_and_rollback_frees_blocks():
    """An echo model repeats its last token: lookup drafts of a run are all kept, so a request
    needs far fewer steps; random prompts get rejected drafts, whose blocks come back."""
    model = echo_model()
    engine = Engine(model, block_size=2, num_blocks=120)
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True,
                            prompt_lookup_num_tokens=5)
    engine.add_request([5, 9, 9, 9], params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert steps <= 24 // 6 + 2  # a prefill step, then up to 6 tokens a step
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]
    blocks = BlockManager(8, 4)
    table: list[int] = []
    blocks.append_slots(table, 0, 11)  # 3 blocks: a verify step's last token and drafts
    blocks.truncate(table, 5)          # 5 tokens kept: the third block held rejected drafts
    assert len(table) == 2 and blocks.num_free_blocks == 6


@pytest.mark.parametrize("max_new", [1, 2, 5, 13])
def test_stop_ids_eos_and_length_exact_when_drafts_reach_past_them(max_new):
    """Repetitive prompts whose phrases hold EOS and stop ids: drafts copied from them run into
    the stop tokens, and min_new_tokens bans them at some of the verified positions."""
    model = echo_model(scale=0.5)
    vocab, eos = model.config.vocab_size, model.config.eos_token_id
    prompts = [[7, 8, eos, 7, 8, eos, 7, 8], [4, 11, 12, 4, 11, 12, 4, 11], [9, 9, 9, 9]]
    engine = Engine(model, block_size=4, num_blocks=80, draft_model=model)
    for extra in (dict(), dict(min_new_tokens=min(3, max_new), stop_token_ids=[12, 30]),
                  dict(stop_token_ids=[9], min_new_tokens=max_new // 2)):
        plain = SamplingParams(temperature=0.0, max_new_tokens=max_new, **extra)
        want = outputs(engine, prompts, plain)
        for spec in (dict(prompt_lookup_num_tokens=6), dict(num_speculative_tokens=6)):
            assert outputs(engine, prompts, replace(plain, **spec)) == want
        assert all(len(w) <= max_new for w in want)
    assert vocab > 30


def test_penalties_and_history_masks_see_the_drafts_before_each_position():
    """The echo model repeats its last token, lookup drafts repeats too: a repetition penalty,
    n-gram blocking and bad words must each reject some drafts, exactly as without lookup."""
    model = echo_model(scale=0.5)
    prompts = [[5, 9, 9, 9, 9], [3, 4, 3, 4, 3, 4, 3], [6, 7, 8, 6, 7, 8, 6]]
    engine = Engine(model, block_size=4, num_blocks=80)
    for extra in (dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
                  dict(bad_words_ids=[[4, 3], [8, 6, 7]])):
        kw = dict(temperature=0.0, max_new_tokens=14, ignore_eos=True, **extra)
        want = outputs(engine, prompts, SamplingParams(**kw))
        assert outputs(engine, prompts, SamplingParams(prompt_lookup_num_tokens=4, **kw)) == want


def test_seeded_sampling_draws_the_same_tokens_with_lookup():
    model = echo_model(scale=0.3)
    prompts = [[5, 9, 9, 9, 9], [3, 4, 3, 4, 3, 4]]
    kw = dict(temperature=0.9, top_k=6, max_new_tokens=20, ignore_eos=True)
    engine = Engine(model, block_size=4, num_blocks=80, draft_model=tiny_model("qwen2"))
    plain = [SamplingParams(seed=s, **kw) for s in (1, 2)]
    want = outputs(engine, prompts, plain)
    for spec in (dict(prompt_lookup_num_tokens=3), dict(num_speculative_tokens=3)):
        assert outputs(engine, prompts, [replace(p, **spec) for p in plain]) == want


WARP = dict(temperature=0.8, top_k=4, top_p=1.0, min_p=0.0)


def sampled_joint(model, prompt: list[int], rows: int, steps: int, drafter: str) -> torch.Tensor:
    """[rows, steps] tokens of ``rows`` requests of one prompt, sampled with speculation."""
    extra, kw = ((dict(prompt_lookup_num_tokens=2), {}) if drafter == "lookup" else
                 (dict(num_speculative_tokens=2), dict(draft_model=echo_model(scale=1.0))))
    engine = Engine(model, block_size=4, num_blocks=rows * 4, max_num_seqs=rows,
                    max_batch_tokens=rows * 8, enable_prefix_caching=False, **kw)
    params = SamplingParams(max_new_tokens=steps, ignore_eos=True, **extra, **WARP)
    torch.manual_seed(3)
    return torch.tensor(outputs(engine, [prompt] * rows, params))


@pytest.mark.parametrize("drafter, verifier", [("lookup", "engine"), ("lookup", "accept_all"),
                                               ("model", "engine"), ("model", "accept_all")])
def test_sampling_follows_the_target_joint_distribution(drafter, verifier, monkeypatch):
    """Joint frequencies of 4 new tokens over 2000 requests of one prompt against the exact
    joint. The drafts (lookup: the prompt's run; model: the echo model's greedy repeats) are
    accepted or rejected; a verifier that keeps every draft must fail the same test."""
    model = echo_model(scale=0.25)
    prompt = [17, 40, 23, 23, 23, 23]
    seen = acceptance(monkeypatch)
    if verifier == "accept_all":
        def keep_all(choice, drafts, lengths):
            return lengths, choice.gather(1, lengths[:, None])[:, 0]
        monkeypatch.setattr(speculative, "accepted_prefix", keep_all)
    out = sampled_joint(model, prompt, rows=2000, steps=4, drafter=drafter)
    assert 0 < seen["kept"] < seen["proposed"] or verifier == "accept_all"
    joint = exact_joint(model, torch.tensor(prompt), 4, WARP)
    cells = {seq: i for i, seq in enumerate(joint)}
    index = torch.tensor([cells.get(tuple(r), -1) for r in out.tolist()])
    if verifier == "engine":
        assert int(index.min()) >= 0, "a sequence of probability zero was drawn"
        assert p_value(index, torch.tensor(list(joint.values()))) > 1e-3
    else:
        assert int(index.min()) < 0 or p_value(
            index, torch.tensor(list(joint.values()))) < 1e-6


@pytest.mark.parametrize("field, value, match", [
    ("prompt_lookup_num_tokens", -1, r"prompt_lookup_num_tokens must be an integer >= 0"),
    ("prompt_lookup_num_tokens", 2.5, r"prompt_lookup_num_tokens must be an integer >= 0"),
    ("prompt_lookup_num_tokens", True, r"prompt_lookup_num_tokens must be an integer >= 0"),
    ("max_matching_ngram_size", 0, r"max_matching_ngram_size must be an integer >= 1"),
])
def test_invalid_speculation_parameters_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_draft_model_greedy_equals_plain_engine_mixed(family, monkeypatch):
    model = tiny_model(family)
    draft = tiny_model("llama")  # another model of the same vocabulary (sizes differ)
    vocab = model.config.vocab_size
    prompts = [repetitive(n, vocab, seed) for seed, n in enumerate([13, 5, 21, 30])]
    plain = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
             for n in (24, 17, 30, 9)]
    ref = outputs(Engine(model, block_size=4, num_blocks=200), prompts, plain)
    for candidate in (draft, model):  # mostly rejected; the target itself: always accepted
        seen = acceptance(monkeypatch)
        mixed = [replace(p, num_speculative_tokens=k) for p, k in zip(plain, (4, 0, 3, 2))]
        engine = Engine(model, block_size=4, num_blocks=200, draft_model=candidate)
        assert outputs(engine, prompts, mixed) == ref
        assert engine.stats["free_blocks"] == engine.stats["num_blocks"]
        # The draft's cache is in step with the target's: a copy of it drafts the same tokens.
        assert seen["proposed"] > 0 and (candidate is draft or seen["kept"] == seen["proposed"])


@pytest.mark.parametrize("drafter", ["lookup", "model"])
def test_preemption_abort_and_prefix_cache_keep_outputs_exact(drafter, monkeypatch):
    """Outputs equal to plain greedy through preemption (recomputed), prefix-cache hits and an
    abort. With the target as its own draft, every draft is kept only if the draft's cache
    stays in step with the target's."""
    seen = acceptance(monkeypatch)
    model = tiny_model("llama")
    vocab = model.config.vocab_size
    prompts = [repetitive(n, vocab, seed) for seed, n in enumerate([11, 18, 7, 25, 14, 9])]
    plain = SamplingParams(temperature=0.0, max_new_tokens=28, ignore_eos=True)
    spec, kw = ((replace(plain, prompt_lookup_num_tokens=4), {}) if drafter == "lookup" else
                (replace(plain, num_speculative_tokens=3), dict(draft_model=model)))
    ref = outputs(Engine(model, block_size=4), prompts, plain)
    small = Engine(model, block_size=4, num_blocks=22, **kw)
    assert outputs(small, prompts, [spec, plain] * 3) == ref
    assert outputs(small, prompts, [spec] * 6) == ref  # prompts from the prefix cache
    assert small.stats["preemptions"] > 0 and small.stats["prefix_cache_hits"] > 0
    engine = Engine(model, block_size=4, num_blocks=60, **kw)
    ids = [engine.add_request(p, spec) for p in prompts]
    for _ in range(3):
        engine.step()
    engine.abort(ids[1])
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals[ids[1]].finish_reason == "abort"
    assert [list(finals[r].output_ids) for r in ids if r != ids[1]] == ref[:1] + ref[2:]
    assert engine.stats["free_blocks"] == engine.stats["num_blocks"]
    assert seen["proposed"] > 0 and (drafter == "lookup" or seen["kept"] == seen["proposed"])


def test_draft_model_parameters_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="num_speculative_tokens needs a draft model"):
        Engine(model, num_blocks=8).add_request([3, 4], SamplingParams(num_speculative_tokens=2))
    with pytest.raises(ValueError, match="at most one of prompt_lookup_num_tokens"):
        SamplingParams(num_speculative_tokens=2, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="cannot be combined with repetition_penalty"):
        SamplingParams(num_speculative_tokens=2, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 0"):
        SamplingParams(num_speculative_tokens=-1)
