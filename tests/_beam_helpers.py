"""Comparison of fastdecode's beam search with ``model.generate`` (or with a reference of an
algorithm transformers no longer ships) up to near-ties.

Near-tie detection: HF's run is repeated with its candidate-selection step
(``_get_top_k_continuations``) wrapped, recording the accumulated scores of every continuation
of every beam at every step ([B, K * V]). A prompt whose output differs from HF's is accepted only
if, at some step, two of the candidates that decide the selection (HF's best ``keep + 1``
accumulated scores, keep = the candidates it retains) are within ``NEAR_TIE`` of each other:
float rounding between two attention implementations can then legitimately swap them.
"""

from __future__ import annotations

import torch

from _hf_helpers import NEAR_TIE, fd_generate, padded_batch


def _hf_with_candidates(model, monkeypatch, *args, **kwargs):
    recorded = []
    inner = model._get_top_k_continuations

    def recording(accumulated_log_probs, *a, beams_to_keep, **kw):
        top = accumulated_log_probs.topk(beams_to_keep + 1, dim=-1).values
        recorded.append(top)
        return inner(accumulated_log_probs, *a, beams_to_keep=beams_to_keep, **kw)

    with monkeypatch.context() as m:
        m.setattr(model, "_get_top_k_continuations", recording)
        out = model.generate(*args, **kwargs)
    assert recorded, "HF's beam search did not run"
    return out, recorded


def _near_tie(recorded: list[torch.Tensor], prompt: int) -> bool:
    gaps = [(-step[prompt].diff()).min().item() for step in recorded]
    return min(g for g in gaps if g == g) <= NEAR_TIE


def assert_beams_match(model, monkeypatch, *args, seed: int | None = None, **kwargs) -> int:
    """Runs ``model.generate`` and ``fastdecode.generate`` with the same arguments (a dict
    output); returns the number of prompts accepted as near-ties. ``seed``: reseed torch's RNG
    before each (beam sampling)."""
    kwargs = dict(kwargs, return_dict_in_generate=True, output_scores=True)
    if seed is not None:
        torch.manual_seed(seed)
    ref, recorded = _hf_with_candidates(model, monkeypatch, *args, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    out = fd_generate(model, *args, fallback="error", **kwargs)
    per_prompt = ref.sequences.shape[0] // recorded[0].shape[0]
    ties = 0
    for prompt in range(recorded[0].shape[0]):
        rows = slice(prompt * per_prompt, (prompt + 1) * per_prompt)
        same = (ref.sequences.shape == out.sequences.shape
                and torch.equal(ref.sequences[rows], out.sequences[rows])
                and torch.equal(ref.beam_indices[rows], out.beam_indices[rows]))
        if same:
            torch.testing.assert_close(out.sequences_scores[rows], ref.sequences_scores[rows],
                                       rtol=0, atol=NEAR_TIE)
        else:
            assert _near_tie(recorded, prompt), (
                f"prompt {prompt} differs from HF without a near-tie:\n{out.sequences[rows]}\n"
                f"vs\n{ref.sequences[rows]}")
            ties += 1
    if ties == 0:
        assert out.sequences.shape == ref.sequences.shape
        assert out.beam_indices.dtype == ref.beam_indices.dtype
        assert len(out.scores) == len(ref.scores)
        for a, b in zip(out.scores, ref.scores):
            torch.testing.assert_close(a, b, rtol=0, atol=NEAR_TIE)
    return ties


def assert_matches_reference(out, expected: torch.Tensor, scores: torch.Tensor, gaps: list[float],
                             rtol: float = 0.0):
    """fastdecode's dict output against a reference's ``(sequences, scores, gaps)``
    (tests/beam_reference.py): a prompt's rows may differ only where the reference compared two
    values within ``NEAR_TIE`` (``gaps[b]``)."""
    per_prompt = out.sequences.shape[0] // len(gaps)
    assert out.sequences.shape[0] == expected.shape[0]
    for b in range(len(gaps)):
        rows = slice(b * per_prompt, (b + 1) * per_prompt)
        width = min(out.sequences.shape[1], expected.shape[1])
        if torch.equal(out.sequences[rows, :width], expected[rows, :width]):
            torch.testing.assert_close(out.sequences_scores[rows],
                                       scores[rows].to(out.sequences_scores.dtype), rtol=rtol,
                                       atol=NEAR_TIE)
        else:
            assert gaps[b] <= NEAR_TIE, (b, out.sequences[rows], expected[rows])
    if out.sequences.shape != expected.shape:
        assert any(g <= NEAR_TIE for g in gaps)


def eos_on_the_way(model, lengths: list[int], seed: int) -> list[int]:
    """EOS ids that beams of the two prompts ``padded_batch(lengths, seed=seed)`` meet early
    (tokens of HF's 2-beam search without EOS), so that hypotheses finish mid-search."""
    ids, mask = padded_batch(lengths, model.config.vocab_size, seed=seed)
    plain = model.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=5,
                           do_sample=False, eos_token_id=None)
    return [int(plain[0, ids.shape[1] + 1]), int(plain[1, ids.shape[1] + 2])]
