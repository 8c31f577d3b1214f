"""Engine end to end on tiny random-weight Llama models: batch invariance against decoding each
prompt alone, preemption, packed mixed steps, streaming, abort, validation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastdecode
from fastdecode import Engine, SamplingParams

EOS = 2
VOCAB = 97


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models: thread synchronisation costs more than the math (10x slower on a busy
    machine), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _new_tokens(sequences: torch.Tensor, prompt_len: int) -> list[int]:
    new = sequences[0, prompt_len:].tolist()
    return new[:new.index(EOS) + 1] if EOS in new else new


def greedy_reference(seed: int, prompts, max_new_tokens: int, **gen_kwargs) -> list[list[int]]:
    """Each prompt decoded alone by fastdecode.generate (greedy), which must agree with HF's
    model.generate too; EOS kept, padding dropped."""
    model = tiny_llama(seed)
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  do_sample=False, **gen_kwargs)
        ours = _new_tokens(fastdecode.generate(model, ids, **kw), len(p))
        assert_same_greedy(seed, p, ours, _new_tokens(model.generate(ids, **kw), len(p)))
        refs.append(ours)
    return refs


def assert_same_greedy(seed: int, prompt, got: list[int], ref: list[int], tol: float = 1e-5):
    """Equal, or diverging only where the top-2 logits of the shared prefix are within tol."""
    if got == ref:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    with torch.no_grad():
        logits = tiny_llama(seed)(torch.tensor([list(prompt) + ref[:i]])).logits[0, -1]
    top = logits.double().topk(2)
    assert float(top.values[0] - top.values[1]) <= tol and got[i] in top.indices.tolist(), (
        f"diverged at token {i}: engine {got[i:i + 3]} vs alone {ref[i:i + 3]}")


PROMPT_LENS = [1, 4, 15, 16, 17, 33, 50]


def prompts_of(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("block_size,max_batch_tokens", [(16, 2048), (5, 24)])
def test_greedy_batch_matches_each_prompt_alone(block_size, max_batch_tokens):
    prompts = prompts_of(PROMPT_LENS)
    refs = greedy_reference(0, prompts, 12)
    engine = Engine(tiny_llama(0), block_size=block_size, num_blocks=128,
                    max_batch_tokens=max_batch_tokens)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for p, out, ref in zip(prompts, outs, refs):
        assert out.finished and out.prompt_ids == p
        assert out.finish_reason == ("stop" if out.output_ids[-1] == EOS else "length")
        assert_same_greedy(0, p, out.output_ids, ref)
    assert engine.stats["free_blocks"] == 128 and not engine.has_unfinished()


def test_repetition_penalty_per_request_matches_generate():
    prompts = prompts_of([6, 21, 9], seed=1)
    penalties = [1.0, 1.5, 0.7]
    refs = [greedy_reference(1, [p], 10, repetition_penalty=r)[0]
            for p, r in zip(prompts, penalties)]
    engine = Engine(tiny_llama(1), num_blocks=32)
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=10, temperature=0,
                                                    repetition_penalty=r) for r in penalties])
    for p, out, ref in zip(prompts, outs, refs):
        assert_same_greedy(1, p, out.output_ids, ref)


def test_preemption_under_a_tiny_cache_keeps_outputs_exact():
    prompts = prompts_of([20, 37, 25, 40, 31, 22, 38, 29], seed=2)
    refs = greedy_reference(2, prompts, 24)
    engine = Engine(tiny_llama(2), block_size=4, num_blocks=40, max_batch_tokens=64)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0))
    assert engine.stats["preemptions"] > 0
    for p, out, ref in zip(prompts, outs, refs):
        assert_same_greedy(2, p, out.output_ids, ref)
    assert engine.stats["free_blocks"] == 40


def test_one_forward_pass_packs_prefill_and_decode():
    engine = Engine(tiny_llama(3), num_blocks=32)
    calls = []
    forward = engine.runner.paged.forward

    def counting(input_ids, positions, ctx):
        calls.append((input_ids.shape[0], ctx.attn.cu_seqlens_q.tolist()))
        return forward(input_ids, positions, ctx)

    engine.runner.paged.forward = counting
    params = SamplingParams(max_new_tokens=5, temperature=0)
    a, b = (engine.add_request(p, params) for p in prompts_of([7, 3], seed=3))
    engine.step()
    c = engine.add_request(prompts_of([11], seed=4)[0], params)
    calls.clear()
    outs = engine.step()
    assert calls == [(13, [0, 1, 2, 13])]  # two decode tokens, then the new prompt, one pass
    assert engine.stats["decode_tokens"] == 2 and engine.stats["prefill_tokens"] == 11
    assert [o.request_id for o in outs] == [a, b, c] and all(len(o.new_ids) == 1 for o in outs)


def test_stream_yields_incremental_tokens():
    engine = Engine(tiny_llama(4), num_blocks=32)
    other = engine.add_request(prompts_of([9], seed=5)[0], SamplingParams(max_new_tokens=30))
    prompt = prompts_of([12], seed=6)[0]
    pieces = list(engine.stream(prompt, SamplingParams(max_new_tokens=7, temperature=0,
                                                       ignore_eos=True)))
    assert [len(p.new_ids) for p in pieces] == [1] * 7
    assert [t for p in pieces for t in p.new_ids] == pieces[-1].output_ids
    assert [p.finished for p in pieces] == [False] * 6 + [True]
    assert pieces[-1].finish_reason == "length"
    assert_same_greedy(4, prompt, pieces[-1].output_ids,
                       greedy_reference(4, [prompt], 7, eos_token_id=None)[0])
    assert other in engine._requests  # the other request kept running alongside


def test_closing_a_stream_aborts_its_request():
    engine = Engine(tiny_llama(4), num_blocks=32)
    it = engine.stream(prompts_of([12], seed=6)[0], SamplingParams(max_new_tokens=50,
                                                                    ignore_eos=True))
    next(it)
    it.close()
    assert engine.stats["free_blocks"] == 32
    outs = engine.step()
    assert [o.finish_reason for o in outs] == ["abort"] and not engine.has_unfinished()


def test_abort_frees_blocks_and_leaves_others_exact():
    prompts = prompts_of([30, 18, 25], seed=7)
    refs = greedy_reference(5, prompts, 10)
    engine = Engine(tiny_llama(5), block_size=4, num_blocks=32, max_batch_tokens=40)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()  # the first prompt fills the budget; the others wait or start
    free = engine.stats["free_blocks"]
    engine.abort(ids[0])
    assert engine.stats["free_blocks"] == free + 8  # 30 tokens in blocks of 4
    engine.abort(ids[0])  # already gone: ignored
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            final.setdefault(o.request_id, []).append(o)
    assert final[ids[0]][0].finish_reason == "abort" and final[ids[0]][0].finished
    for rid, p, ref in zip(ids[1:], prompts[1:], refs[1:]):
        assert_same_greedy(5, p, final[rid][-1].output_ids, ref)
    assert engine.stats["free_blocks"] == 32


def test_forked_sequences_share_the_prompt_and_copy_on_write():
    """What parallel sampling will do: fork a prefilled request; the first write into the
    shared partial block copies it (in every layer) before the forward pass."""
    from fastdecode.engine.sequence import Sequence, Status

    prompt = prompts_of([6], seed=13)[0]
    ref = greedy_reference(11, [prompt], 5, eos_token_id=None)[0]
    engine = Engine(tiny_llama(11), block_size=4, num_blocks=16)
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    rid = engine.add_request(prompt, params)
    engine.step()  # prefill: 6 tokens in blocks [full, 2 of 4], one token drawn
    parent = engine._requests[rid]
    child = Sequence("child", prompt, params, parent.arrival, parent.stop_ids)
    child.token_ids, child.num_computed = list(parent.token_ids), parent.num_computed
    child.block_table = engine.blocks.fork(parent.block_table)
    child.status = Status.RUNNING
    engine.scheduler.running.append(child)
    engine._requests["child"] = child
    assert engine.stats["free_blocks"] == 14
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step())
    assert final[rid].output_ids == final["child"].output_ids
    assert_same_greedy(11, prompt, final[rid].output_ids, ref)
    assert engine.stats["free_blocks"] == 16
