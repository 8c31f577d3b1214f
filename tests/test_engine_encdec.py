"""The Engine on encoder-decoder models (T5 with its relative bias, Flan-T5's gated GELU, BART,
Marian; random float32 weights): mixed requests give each request's tokens of
``fastdecode.generate`` alone, also under forced preemption; both caches' blocks are counted,
freed on abort and never shared across encoder inputs by the prefix cache."""

from __future__ import annotations

import pytest
import torch

import fastdecode
from fastdecode import Engine, SamplingParams
from fastdecode.engine.block_manager import BlockManager, cdiv
from fastdecode.engine.scheduler import Scheduler
from fastdecode.engine.sequence import Sequence
from tiny import SEQ2SEQ, tiny_seq2seq

pytestmark = pytest.mark.usefixtures("one_thread")

_MODELS: dict = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_seq2seq(family)
    return _MODELS[family]


def _prompts(lens, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in lens]


def _alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """The request's new tokens from ``fastdecode.generate`` on its prompt alone (greedy), up
    to EOS included."""
    kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=False,
                  repetition_penalty=params.repetition_penalty,
                  no_repeat_ngram_size=params.no_repeat_ngram_size or None)
    out = fastdecode.generate(model, torch.tensor([prompt]), fallback="error", **kwargs)
    new = out[0, 1:].tolist()
    eos = model.generation_config.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


def _assert_same_greedy(model, prompt, got, ref, tol: float = 1e-5) -> None:
    """Equal, or diverging only where the top-2 logits of the shared prefix are within tol."""
    got = list(got)
    if got == ref:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    start = model.generation_config.decoder_start_token_id
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]),
                       decoder_input_ids=torch.tensor([[start] + ref[:i]])).logits[0, -1]
    top = logits.double().topk(2)
    assert float(top.values[0] - top.values[1]) <= tol and got[i] in top.indices.tolist(), (
        f"diverged at token {i}: engine {got[i:i + 3]} vs alone {ref[i:i + 3]}")


def _run_staggered(engine: Engine, prompts, params) -> dict[str, list[int]]:
    """Half the requests at once, the rest one per step while the first decode (encoder
    batches of several sizes, steps mixing new encodings with decoding); final outputs by id."""
    ids, finals, pending = [], {}, list(zip(prompts, params))
    half = len(pending) // 2
    for p, sp in pending[:half]:
        ids.append(engine.add_request(p, sp))
    pending = pending[half:]
    while engine.has_unfinished() or pending:
        if pending:
            p, sp = pending.pop(0)
            ids.append(engine.add_request(p, sp))
        for out in engine.step():
            if out.finished:
                assert out.finish_reason in ("stop", "length"), out.error
                finals[out.request_id] = list(out.output_ids)
    return [finals[i] for i in ids]


_LENS = [1, 7, 16, 17, 33, 4]


def _mixed_params() -> list[SamplingParams]:
    return [SamplingParams(max_new_tokens=n, temperature=0, repetition_penalty=r,
                           no_repeat_ngram_size=ng)
            for n, r, ng in [(9, 1.0, 0), (14, 1.3, 0), (5, 1.0, 2), (14, 1.0, 0), (11, 0.8, 0),
                             (1, 1.0, 0)]]


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize("block_size,num_blocks", [(5, 96), (4, 16)], ids=["roomy", "preempting"])
def test_mixed_requests_equal_generate_alone(family, block_size, num_blocks):
    model = _model(family)
    prompts, params = _prompts(_LENS, seed=1), _mixed_params()
    refs = [_alone(model, p, sp) for p, sp in zip(prompts, params)]
    engine = Engine(model, block_size=block_size, num_blocks=num_blocks, max_batch_tokens=40)
    outs = _run_staggered(engine, prompts, params)
    for p, out, ref in zip(prompts, outs, refs):
        _assert_same_greedy(model, p, out, ref)
    if num_blocks == 16:
        assert engine.stats["preemptions"] > 0
    assert engine.stats["free_blocks"] == num_blocks and not engine.has_unfinished()


def test_outputs_report_the_encoder_prompt_and_stop_at_stop_ids():
    model = _model("t5")
    prompt = _prompts([9], seed=2)[0]
    ref = _alone(model, prompt, SamplingParams(max_new_tokens=8, temperature=0))
    engine = Engine(model, num_blocks=16, block_size=4)
    out, = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0,
                                                     stop_token_ids=[ref[3]]))
    assert out.prompt_ids == prompt
    assert out.finish_reason == "stop" and out.output_ids[-1] == ref[3]
    assert list(out.output_ids) == ref[:ref.index(ref[3]) + 1]


def _count_encoder_rows(engine: Engine) -> list[int]:
    """The batch size of every encoder call of ``engine`` from now on."""
    rows: list[int] = []
    encoder = engine.runner._encoder
    encoder.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    return rows


def test_encoder_runs_once_per_admission_batched():
    model = tiny_seq2seq("bart")  # its own copy: a hook goes on the encoder
    engine = Engine(model, num_blocks=64, block_size=4)
    rows = _count_encoder_rows(engine)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    for p in _prompts([5, 12, 3], seed=3):
        engine.add_request(p, params)
    engine.step()
    assert rows == [3]  # the step's three new requests, one padded batch
    engine.add_request(_prompts([8], seed=4)[0], params)
    while engine.has_unfinished():
        engine.step()
    assert rows == [3, 1]  # decode steps encode nothing


def test_preempted_requests_are_encoded_again():
    model = tiny_seq2seq("t5")
    prompts = _prompts([6, 9, 7, 8], seed=5)
    params = SamplingParams(max_new_tokens=20, temperature=0)
    refs = [_alone(model, p, params) for p in prompts]
    engine = Engine(model, num_blocks=16, block_size=4)
    rows = _count_encoder_rows(engine)
    outs = engine.generate(prompts, params)
    assert engine.stats["preemptions"] > 0
    assert sum(rows) == len(prompts) + engine.stats["preemptions"]
    for p, out, ref in zip(prompts, outs, refs):
        _assert_same_greedy(model, p, out.output_ids, ref)


def test_a_request_filling_the_whole_cache_runs():
    """Its encoder blocks are taken whole, the admission watermark included (the Engine keeps
    1% of 100 blocks back), when nothing else runs."""
    model = _model("t5")
    prompt = _prompts([99 * 4], seed=10)[0]
    params = SamplingParams(max_new_tokens=2, temperature=0)
    engine = Engine(model, num_blocks=100, block_size=4)
    assert engine.blocks.watermark_blocks == 1
    rid = engine.add_request(prompt, params)
    finals = [o for _ in range(4) for o in engine.step() if o.finished]
    assert [o.request_id for o in finals] == [rid]
    _assert_same_greedy(model, prompt, finals[0].output_ids, _alone(model, prompt, params))


def test_abort_frees_both_caches_blocks():
    engine = Engine(_model("marian"), num_blocks=40, block_size=4)
    lens = [13, 5, 22]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=30, temperature=0))
           for p in _prompts(lens, seed=6)]
    for _ in range(6):
        engine.step()
    seqs = [engine._requests[i] for i in ids]
    assert [len(s.cross_table) for s in seqs] == [cdiv(n, 4) for n in lens]
    held = [len(s.block_table) + len(s.cross_table) for s in seqs]
    assert engine.stats["free_blocks"] == 40 - sum(held)
    assert not set(seqs[0].cross_table) & set(seqs[0].block_table)
    engine.abort(ids[1])
    assert engine.stats["free_blocks"] == 40 - held[0] - held[2]
    waiting = engine.add_request(_prompts([9], seed=7)[0])
    engine.abort(waiting)
    for i in (ids[0], ids[2]):
        engine.abort(i)
    assert engine.stats["free_blocks"] == 40
    finals = {o.request_id: o.finish_reason for o in engine.step()}
    assert finals == {i: "abort" for i in ids + [waiting]}


def test_seeded_sampling_alone_mixed_and_preempted():
    model = _model("flan_t5")
    prompt, *others = _prompts([10, 20, 17, 25], seed=8)
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=11)
    alone = Engine(model, num_blocks=64, block_size=4).generate([prompt], seeded)[0]
    busy = Engine(model, num_blocks=20, block_size=4)
    outs = busy.generate([*others, prompt], [SamplingParams(max_new_tokens=16, temperature=1.2)]
                         * len(others) + [seeded])
    assert busy.stats["preemptions"] > 0
    assert list(outs[-1].output_ids) == list(alone.output_ids)


def test_unseeded_request_alone_draws_like_generate():
    """Without a seed both draw one row per step from torch's RNG."""
    model = _model("bart")
    prompt = _prompts([12], seed=9)[0]
    torch.manual_seed(3)
    ref = fastdecode.generate(model, torch.tensor([prompt]), max_new_tokens=12, do_sample=True,
                              top_k=0, temperature=0.8, fallback="error")[0, 1:].tolist()
    engine = Engine(model, num_blocks=16, block_size=4)
    torch.manual_seed(3)
    out, = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.8))
    assert list(out.output_ids) == ref[:len(out.output_ids)]


def _scheduled(blocks: BlockManager, seq: Sequence) -> Sequence:
    """Admit ``seq`` alone and run its step (no model: a prompt chunk short of the end)."""
    scheduler = Scheduler(blocks, max_num_seqs=4, max_batch_tokens=64)
    scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.seqs == [seq]
    scheduler.postprocess(batch, [None], {})
    return seq


def test_prefix_cache_never_shares_decoder_blocks_across_encoder_inputs():
    """A request readmitted with generated tokens looks its decoder blocks up in the prefix
    cache: only blocks computed over the same encoder input may match."""
    blocks = BlockManager(32, 4, enable_caching=True)
    decoded = [0] + list(range(3, 20))  # a decoder start and 17 generated tokens

    def request(name: str, encoder_ids: list[int]) -> Sequence:
        seq = Sequence(name, [0], SamplingParams(max_new_tokens=40), 0, frozenset(),
                       encoder_ids=encoder_ids)
        seq.token_ids = list(decoded)
        return seq

    first = _scheduled(blocks, request("a", [5, 6, 7]))
    assert first.num_cached_blocks == 4
    other = _scheduled(blocks, request("b", [5, 6, 8]))
    same = _scheduled(blocks, request("c", [5, 6, 7]))
    assert not set(other.block_table) & set(first.block_table)
    assert same.block_table[:4] == first.block_table[:4]
    for seq in (first, other, same):
        assert len(seq.cross_table) == 1 and not set(seq.cross_table) & set(seq.block_table)


def test_bad_requests_name_the_parameter():
    model = _model("bart")
    engine = Engine(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match=r"prompt_ids must be token ids in \[0, 211\)"):
        engine.add_request([5, 211])
    with pytest.raises(ValueError, match="KV blocks, the cache has 8"):
        engine.add_request(list(range(3, 20)), SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.add_request([3] * (model.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        engine.add_request([3, 4], SamplingParams(prompt_lookup_num_tokens=3))
    with pytest.raises(ValueError, match="draft_model"):
        Engine(model, num_blocks=8, draft_model=model)
    assert engine.stats["free_blocks"] == 8 and not engine.has_unfinished()


def test_a_model_without_a_decoder_start_is_refused():
    model = tiny_seq2seq("t5")
    model.generation_config.decoder_start_token_id = None
    model.generation_config.bos_token_id = None
    model.config.decoder_start_token_id = None
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        Engine(model, num_blocks=8)
