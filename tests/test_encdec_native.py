"""The native encoder-decoder step (:class:`fastdecode.models.Seq2SeqStep`): its logits equal the
HF decoder's on the same paged caches (plain and packed weights, prefixes past T5's relative
bias saturation, encoder padding), fastdecode.generate uses it and gives HF's tokens and scores,
and every exclusion (switch, hooks, other models) keeps the HF modules."""

from __future__ import annotations

import pytest
import torch
import transformers

from _beam_helpers import assert_beams_match
from _hf_helpers import BACKEND, assert_greedy_match, fd_generate
from fastdecode.hf.seq2seq import Seq2SeqRunner
from fastdecode.models import Seq2SeqStep, unsupported_reason
from tiny import SEQ2SEQ, tiny_seq2seq

P = 4
_MODELS: dict = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_seq2seq(family)
    return _MODELS[family]


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """Counts native step calls (one entry per call)."""
    calls: list[int] = []
    original = Seq2SeqStep.__call__
    monkeypatch.setattr(Seq2SeqStep, "__call__",
                        lambda self, *args: calls.append(1) or original(self, *args))
    return calls


def _encoded(model, seed: int = 0):
    """Two prompts, the second right-padded: (encoder states [2, 9, d_model], mask [2, 9])."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        states = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return states, mask


def run_steps(model, encoded: tuple, native: bool, packed: bool) -> list[torch.Tensor]:
    """A prefill of decoder prefixes of 23 and 5 tokens (past T5's max distance, 20), then two
    decode steps, over shuffled blocks. encoded: :func:`_encoded`'s states and mask."""
    states, mask = encoded
    runner = Seq2SeqRunner(model, encoder_states=states, encoder_mask=mask, rows_per_prompt=1,
                           num_blocks=16, block_size=P, backend=BACKEND, native=native,
                           fast_linears=packed)
    assert (runner.native is not None) == native
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (25, 7)]
    tables = [[9, 2, 14, 5, 0, 11, 3], [1, 12]]
    planner = runner.planner()
    logits = []
    for spans in ([(0, 23), (0, 5)], [(23, 24), (5, 6)], [(24, 25), (6, 7)]):
        plan = planner.build([b - a for a, b in spans], [b for _, b in spans], tables,
                             token_ids=torch.cat([s[a:b] for s, (a, b) in zip(seqs, spans)])
                             .tolist())
        logits.append(runner.forward(plan.input_ids, plan.positions, plan))
    return logits


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_native_logits_equal_hf_decoder(family, packed, monkeypatch):
    assert_native_matches_hf(_model(family), packed, monkeypatch)


@pytest.mark.parametrize("family", ["bart", "marian"])
def test_native_logits_scaled_embeddings(family, monkeypatch):
    """scale_embedding=True (Marian checkpoints' setting): token embeddings times sqrt(d)."""
    assert_native_matches_hf(tiny_seq2seq(family, scale_embedding=True), False, monkeypatch)


def assert_native_matches_hf(model, packed: bool, monkeypatch) -> None:
    encoded = _encoded(model)
    hf = run_steps(model, encoded, native=False, packed=packed)
    decoder = model.get_decoder()
    layer = decoder.block[0] if hasattr(decoder, "block") else decoder.layers[0]

    def forbidden(*args, **kwargs):
        raise AssertionError("an HF decoder layer ran")

    with monkeypatch.context() as m:
        m.setattr(type(layer), "forward", forbidden)
        ours = run_steps(model, encoded, native=True, packed=packed)
    for a, b in zip(ours, hf):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _padded(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (rows, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_generate_greedy_native_then_switched_off(family, native_calls, monkeypatch):
    """Tokens and scores equal model.generate's with the native step, and again with
    FASTDECODE_NATIVE=0 (which must not call it)."""
    model = _model(family)
    ids, mask = _padded(3, seed=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=26, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    ref = model.generate(ids, **kwargs)
    for switch in ("1", "0"):
        monkeypatch.setenv("FASTDECODE_NATIVE", switch)
        before = len(native_calls)
        ours = fd_generate(model, ids, fallback="error", **kwargs)
        assert (len(native_calls) > before) == (switch == "1")
        if not assert_greedy_match(ref, ours.sequences, ref.sequences.shape[1] - len(ref.scores)):
            for a, b in zip(ours.scores, ref.scores):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_beam5_recipe_native(family, native_calls, monkeypatch):
    """num_beams=5, no_repeat_ngram_size=2, early_stopping=True on a padded batch: sequences and
    sequence scores as HF's (up to near-ties), through the native step."""
    ids, mask = _padded(3, seed=5)
    assert_beams_match(_model(family), monkeypatch, ids, attention_mask=mask, max_new_tokens=24,
                       num_beams=5, no_repeat_ngram_size=2, early_stopping=True)
    assert native_calls


def test_decoder_hook_takes_hf_modules(native_calls):
    """A forward hook on the decoder (e.g. capturing hidden states) must see it run."""
    model = tiny_seq2seq("bart")
    seen: list[int] = []
    handle = model.get_decoder().register_forward_hook(lambda *a: seen.append(1))
    try:
        ids, mask = _padded(3, seed=7)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        count = len(seen)
        ours = fd_generate(model, ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    finally:
        handle.remove()
    assert not native_calls and len(seen) > count
    assert torch.equal(ours, ref)


def test_exclusions_are_named():
    """Other encoder-decoder families and training mode keep the HF modules, with a reason."""
    assert unsupported_reason(_model("t5")) is None
    if hasattr(transformers, "MBartConfig"):
        config = transformers.MBartConfig(vocab_size=64, d_model=16, encoder_layers=1,
                                          decoder_layers=1, encoder_attention_heads=2,
                                          decoder_attention_heads=2, encoder_ffn_dim=16,
                                          decoder_ffn_dim=16)
        assert "no native step" in unsupported_reason(
            transformers.MBartForConditionalGeneration(config).eval())
    model = tiny_seq2seq("marian").train()
    assert "training" in unsupported_reason(model)
