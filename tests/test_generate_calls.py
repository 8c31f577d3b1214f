"""Every calling form of ``model.generate`` on a patched model, and patched models that are copied.

A patched model must accept exactly what ``model.generate`` accepts (positional ``inputs``,
``inputs=``, ``input_ids=``, ``**tokenizer(...)``, ``generation_config=``, model kwargs) and give
the same tokens; ``copy.deepcopy`` and pickle round trips must generate with their own weights;
``unpatch`` must leave the instance exactly as it was.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle

import pytest
import torch
from transformers import GenerationConfig

import fastdecode
from _hf_helpers import padded_batch
from tiny import byte_tokenizer, tiny_model

NEW = 7


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def gpt2(tok):
    return tiny_model("gpt2", vocab_size=len(tok))  # takes token_type_ids


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture
def native_only(monkeypatch):
    """Count fastdecode's own decoding runs; the original generate stays callable (for refs)."""
    gen_module = importlib.import_module("fastdecode.hf.generate")  # the module, not the function
    runs = []
    original = gen_module._decode
    monkeypatch.setattr(gen_module, "_decode", lambda *a, **k: runs.append(1) or original(*a, **k))
    return runs


def _calls(ids, mask, config):
    """(name, args, kwargs) of each calling form; all mean the same request."""
    return [
        ("positional", (ids,), dict(attention_mask=mask, max_new_tokens=NEW)),
        ("inputs=", (), dict(inputs=ids, attention_mask=mask, max_new_tokens=NEW)),
        ("input_ids=", (), dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)),
        ("**tokenizer", (), dict({"input_ids": ids, "attention_mask": mask}, max_new_tokens=NEW)),
        ("generation_config=", (ids,), dict(attention_mask=mask, generation_config=config)),
        ("positional generation_config", (ids, config), dict(attention_mask=mask)),
    ]


def test_every_calling_form_gives_the_same_tokens(llama, native_only):
    ids, mask = padded_batch([6, 3, 5], llama.config.vocab_size, seed=4)
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    fastdecode.patch(llama)
    try:
        for name, args, kwargs in _calls(ids, mask, config):
            out = llama.generate(*args, **kwargs)
            assert torch.equal(out, ref), name
        assert len(native_only) == len(_calls(ids, mask, config))
        with pytest.raises(ValueError, match="inputs"):  # HF's error for both at once
            llama.generate(ids, input_ids=ids, max_new_tokens=2)
        with pytest.raises(TypeError):  # HF's signature: too many positional arguments
            llama.generate(*([None] * 20))
    finally:
        fastdecode.unpatch(llama)


def test_tokenizer_output_with_token_type_ids(gpt2, tok, native_only):
    enc = tok(["hello wor", "abc"], return_tensors="pt", padding=True, return_token_type_ids=True)
    enc["token_type_ids"] = torch.randint(0, 2, enc["input_ids"].shape,
                                          generator=torch.Generator().manual_seed(0))
    ref = gpt2.generate(**enc, max_new_tokens=NEW, do_sample=False)
    plain = gpt2.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                          max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(ref, plain)  # the token types change the result
    fastdecode.patch(gpt2)
    try:
        assert torch.equal(gpt2.generate(**enc, max_new_tokens=NEW, do_sample=False), ref)
    finally:
        fastdecode.unpatch(gpt2)
    assert native_only == [1]


def test_signature_and_unpatch_are_exact(llama):
    before = dict(llama.__dict__)
    signature = inspect.signature(llama.generate)
    fastdecode.patch(llama)
    assert fastdecode.patch(llama) is llama  # idempotent
    assert inspect.signature(llama.generate) == signature
    assert llama.generate.__self__ is llama
    assert fastdecode.unpatch(llama) is llama
    assert llama.__dict__ == before and "generate" not in llama.__dict__
    assert fastdecode.unpatch(llama) is llama  # no-op when not patched


def test_unpatch_restores_an_instance_level_generate(llama):
    own = lambda *args, **kwargs: "own"  # noqa: E731 (e.g. a remote-code custom generate)
    llama.generate = own
    try:
        fastdecode.patch(llama)
        assert llama.generate is not own
        fastdecode.unpatch(llama)
        assert llama.__dict__["generate"] is own
    finally:
        del llama.generate


def _perturbed_copy(model, make_copy):
    """A copy of the patched model whose weights then differ from the original's."""
    clone = make_copy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(-1.0)
    return clone


@pytest.mark.parametrize("make_copy", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_copies_of_a_patched_model_generate_with_their_own_weights(make_copy, native_only):
    model = tiny_model("qwen2")
    ids, mask = padded_batch([5, 2], model.config.vocab_size, seed=1)
    fastdecode.patch(model)
    clone = _perturbed_copy(model, make_copy)
    assert clone.generate.__self__ is clone
    out_clone = clone.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    out_model = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert native_only == [1, 1]
    for patched in (clone, model):
        fastdecode.unpatch(patched)
        assert "generate" not in patched.__dict__
    assert torch.equal(out_clone, clone.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                                                 do_sample=False))
    assert torch.equal(out_model, model.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                                                 do_sample=False))
    assert not torch.equal(out_clone, out_model)
