"""fastdecode.generate: stop strings, streamer, dict outputs, processors, fallback, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

from _hf_helpers import RecordingStreamer, fd_generate, padded_batch
from fastdecode.hf import FallbackError
from tiny import byte_tokenizer, tiny_model

NEW = 10


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def batch(llama):
    return padded_batch([7, 3, 5], llama.config.vocab_size, seed=2)


def test_stop_strings_with_tokenizer():
    tok = byte_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    enc = tok(["hello wor", "abc"], return_tensors="pt", padding=True)
    plain = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = tok.decode(plain[0, enc.input_ids.shape[1]:])
    stop = text[4:6]  # appears after a few tokens in row 0
    kwargs = dict(max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tok)
    ref = model.generate(**enc, **kwargs)
    out = fd_generate(model, **enc, **kwargs)
    assert torch.equal(out, ref)
    assert stop in tok.decode(out[0, enc.input_ids.shape[1]:])
    assert out[0, -1] == tok.pad_token_id  # row 0 stopped early and was padded
    with pytest.raises(ValueError, match="tokenizer"):
        fd_generate(model, **enc, max_new_tokens=3, stop_strings=["x"])


def test_streamer_sees_the_same_calls(llama, batch):
    ids, mask = batch
    seen = {}
    for name, run in (("hf", llama.generate), ("fd", lambda *a, **k: fd_generate(llama, *a, **k))):
        streamer = RecordingStreamer()
        run(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, streamer=streamer)
        seen[name] = streamer.calls
    assert [c[0] for c in seen["fd"]] == [c[0] for c in seen["hf"]]
    for (_, a), (_, b) in zip(seen["fd"], seen["hf"]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("do_sample", [False, True])
def test_return_dict_scores_and_logits(llama, batch, do_sample):
    ids, mask = batch
    kwargs = dict(max_new_tokens=NEW, do_sample=do_sample, return_dict_in_generate=True,
                  output_scores=True, output_logits=True, repetition_penalty=1.3,
                  temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(0)
    ref = llama.generate(ids, attention_mask=mask, **kwargs)
    out = fd_generate(llama, ids, attention_mask=mask, **kwargs)
    assert type(out) is type(ref)
    assert len(out.scores) == len(out.logits) == out.sequences.shape[1] - ids.shape[1]
    steps = len(ref.scores) if not do_sample else 1  # sampled steps diverge after the first
    for s in range(steps):
        torch.testing.assert_close(out.logits[s], ref.logits[s], atol=1e-4, rtol=1e-4)
        assert torch.equal(out.scores[s].isinf(), ref.scores[s].isinf())
        finite = ~ref.scores[s].isinf()
        torch.testing.assert_close(out.scores[s][finite], ref.scores[s][finite], atol=1e-4,
                                   rtol=1e-4)
    if not do_sample:
        assert torch.equal(out.sequences, ref.sequences)
    plain = fd_generate(llama, ids, attention_mask=mask, max_new_tokens=2, output_scores=True)
    assert isinstance(plain, torch.Tensor)  # output_scores without return_dict: a tensor


class _Recorder(LogitsProcessor):
    """Records what it receives and bans token 5 (so its effect is visible)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, input_ids, scores):
        self.inputs.append((input_ids.clone(), scores.clone()))
        scores = scores.clone()
        scores[:, 5] = -float("inf")
        return scores


def test_user_processor_runs_between_penalty_and_warpers(llama, batch):
    ids, mask = batch
    kwargs = dict(max_new_tokens=1, do_sample=True, temperature=0.5, top_k=30,
                  repetition_penalty=1.4, return_dict_in_generate=True, output_scores=True)
    results = {}
    for name, run in (("hf", llama.generate), ("fd", lambda *a, **k: fd_generate(llama, *a, **k))):
        recorder = _Recorder()
        out = run(ids, attention_mask=mask, logits_processor=LogitsProcessorList([recorder]),
                  **kwargs)
        results[name] = (recorder.inputs[0], out.scores[0])
    (hf_ids, hf_in), hf_scores = results["hf"]
    (fd_ids, fd_in), fd_scores = results["fd"]
    assert torch.equal(fd_ids, hf_ids)
    torch.testing.assert_close(fd_in, hf_in, atol=1e-4, rtol=1e-4)  # penalised, not tempered
    assert fd_scores[:, 5].isinf().all()
    assert torch.equal(fd_scores.isinf(), hf_scores.isinf())


class _StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length)


def test_user_stopping_criteria(llama, batch):
    ids, mask = batch
    kwargs = dict(max_new_tokens=NEW, do_sample=False, stopping_criteria=[_StopAfter(ids.shape[1] + 4)])
    ref = llama.generate(ids, attention_mask=mask, **kwargs)
    out = fd_generate(llama, ids, attention_mask=mask, **kwargs)
    assert torch.equal(out, ref) and out.shape[1] == ids.shape[1] + 4


def test_fallback_warns_once_naming_the_option(llama, batch):
    ids, mask = batch
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=4, suppress_tokens=[5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fd_generate(llama, ids, attention_mask=mask, max_new_tokens=4, suppress_tokens=[5])
    ours = [w for w in caught if "fastdecode" in str(w.message)]
    assert len(ours) == 1 and "suppress_tokens" in str(ours[0].message)
    assert torch.equal(out, ref)
    with pytest.raises(FallbackError, match="suppress_tokens"):
        fd_generate(llama, ids, attention_mask=mask, suppress_tokens=[5], fallback="error")


BAD = [dict(do_sample=True, temperature=0.0), dict(do_sample=True, temperature=-1.0),
       dict(do_sample=True, top_k=-3), dict(num_return_sequences=2),
       dict(repetition_penalty=0.0), dict(do_sample=True, min_p=2.0), dict(max_length=3),
       dict(foo_bar=3), dict(do_sample=True, temperature=2), dict(repetition_penalty=2)]


@pytest.mark.parametrize("kwargs", BAD, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_bad_input_raises_like_hf(llama, batch, kwargs):
    ids, mask = batch
    with pytest.raises(Exception) as hf_exc:
        llama.generate(ids, attention_mask=mask, max_new_tokens=3 if "max_length" not in kwargs
                       else None, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(type(hf_exc.value)):
            fd_generate(llama, ids, attention_mask=mask, max_new_tokens=3
                        if "max_length" not in kwargs else None, **kwargs)


def test_nan_logits_raise_value_error(batch):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[7].fill_(float("nan"))
    ids, mask = batch
    with pytest.raises(ValueError, match="no valid token"):
        fd_generate(model, ids, attention_mask=mask, max_new_tokens=3, do_sample=True)


def test_attention_implementation_restored_on_error(llama):
    from fastdecode.hf.context import PagedContext
    from fastdecode.hf.runner import PagedRunner

    runner = PagedRunner(llama, num_blocks=2, block_size=4, backend="torch")
    before = llama.config._attn_implementation
    bad = PagedContext.build([[0]], [2], [2], 4, "cpu", backend="torch")
    with pytest.raises(Exception):
        runner.forward(torch.tensor([3, 4, 5]), torch.arange(3), bad)  # 3 tokens, 2 slots
    assert llama.config._attn_implementation == before


def _banned_for(model, ids, mask):
    """bad_words_ids that hit what greedy decoding would produce: its first new token, and the
    pair (first, second) so the second one is banned only after the first."""
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    first, second = int(plain[0, -2]), int(plain[1, -1])
    return [[first], [int(plain[1, -2]), second], [1, 0]]


@pytest.mark.parametrize("output_scores", [False, True], ids=["fused", "scores"])
def test_bad_words_ids(llama, batch, output_scores):
    ids, mask = batch
    bad = _banned_for(llama, ids, mask)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, bad_words_ids=bad,
                  return_dict_in_generate=True, output_scores=output_scores)
    ref = llama.generate(ids, attention_mask=mask, **kwargs)
    out = fd_generate(llama, ids, attention_mask=mask, fallback="error", **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert not (out.sequences[:, ids.shape[1]:] == bad[0][0]).any()
    if output_scores:
        for ours, theirs in zip(out.scores, ref.scores):
            assert torch.equal(ours.isinf(), theirs.isinf())
    sampled = fd_generate(llama, ids, attention_mask=mask, fallback="error", do_sample=True,
                          top_k=0, max_new_tokens=NEW, bad_words_ids=bad, num_return_sequences=3)
    assert not (sampled[:, ids.shape[1]:] == bad[0][0]).any()


def test_remove_invalid_values(batch):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[7].fill_(float("nan"))
        model.lm_head.weight[9].fill_(float("inf"))
    ids, mask = batch
    kwargs = dict(max_new_tokens=4, remove_invalid_values=True, return_dict_in_generate=True,
                  output_scores=True)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    out = fd_generate(model, ids, attention_mask=mask, fallback="error", do_sample=False, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for ours, theirs in zip(out.scores, ref.scores):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    drawn = fd_generate(model, ids, attention_mask=mask, fallback="error", do_sample=True,
                        max_new_tokens=4, remove_invalid_values=True)  # no NaN error
    assert drawn.shape == out.sequences.shape
