"""Decoding strategies beyond one token per step: speculative decoding (``assistant_model`` /
``prompt_lookup_num_tokens``) and contrastive search (``penalty_alpha`` with ``top_k``).

:func:`reasons` lists what of a call the strategy does not run (the call then falls back like any
other unsupported request); :func:`decode` runs speculative decoding; contrastive search runs in
the common loop with :func:`contrastive_parts`.
"""

from __future__ import annotations

import torch
from transformers.generation import GenerationMode

from fastdecode.hf import drafters, speculative
from fastdecode.hf.contrastive import BranchingStepper, Selector
from fastdecode.hf.options import Options
from fastdecode.hf.prepare import Prepared
from fastdecode.hf.runner import has_unsupported_attention, uses_attention_interface
from fastdecode.hf.sampling import TokenSelector
from fastdecode.hf.steppers import PagedStepper


def speculative_call(prepared: Prepared) -> bool:
    return prepared.mode == GenerationMode.ASSISTED_GENERATION


def contrastive_call(prepared: Prepared) -> bool:
    return prepared.mode == GenerationMode.CONTRASTIVE_SEARCH


def reasons(prepared: Prepared, opts: Options, paged: bool, streamer,
            logits_processor) -> list[str]:
    """What of this call's strategy fastdecode does not run natively (nothing for plain greedy
    and sampling calls)."""
    if contrastive_call(prepared):
        return [] if paged else ["contrastive search of a call that needs HF's own cache and masks"]
    if not speculative_call(prepared):
        return []
    why = []
    if not paged:
        why.append("speculative decoding of a call that needs HF's own cache and masks")
    assistant = prepared.mode_kwargs.get("assistant_model")
    if assistant is not None and (not uses_attention_interface(assistant)
                                  or has_unsupported_attention(assistant)):
        why.append(f"assistant_model {type(assistant).__name__} (its attention cannot run on the "
                   "paged cache)")
    extras = {"repetition_penalty": opts.repetition_penalty != 1.0,
              "bad_words_ids": bool(opts.bad_words),
              "no_repeat_ngram_size": bool(opts.no_repeat_ngram_size),
              "remove_invalid_values": opts.remove_invalid_values,
              "return_dict_in_generate": opts.return_dict, "streamer": streamer is not None,
              "logits_processor": bool(logits_processor), "stopping_criteria": bool(opts.criteria),
              "inputs_embeds / token_type_ids": any(
                  prepared.model_kwargs.get(k) is not None
                  for k in ("inputs_embeds", "token_type_ids"))}
    why += [f"{name} with speculative decoding" for name, on in extras.items() if on]
    return why


def contrastive_parts(model, prepared: Prepared, opts: Options, selector: TokenSelector,
                      backend: str) -> tuple[BranchingStepper, Selector]:
    """The stepper and selector of a contrastive-search call (``selector`` must return scores)."""
    alpha = float(prepared.config.penalty_alpha)
    vocab = model.config.get_text_config().vocab_size
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"penalty_alpha must be in [0, 1], got {alpha}")
    if not 1 < opts.top_k <= vocab:
        raise ValueError(f"contrastive search needs top_k in [2, {vocab}], got {opts.top_k}")
    stepper = BranchingStepper(model, prepared, opts.max_new_tokens, opts.top_k, backend=backend)
    return stepper, Selector(selector, stepper, alpha)


def decode(model, prepared: Prepared, opts: Options, backend: str) -> torch.Tensor:
    """Speculative decoding of a prepared call -> sequences [B, L + new] int64."""
    config = prepared.config
    target = PagedStepper(model, prepared, opts.max_new_tokens, backend=backend)
    verifier = speculative.Verifier(opts, backend)
    assistant = prepared.mode_kwargs.get("assistant_model")
    if assistant is None:
        ngram = config.max_matching_ngram_size
        drafter = drafters.PromptLookup(int(config.prompt_lookup_num_tokens),
                                        2 if ngram is None else int(ngram), opts.eos,
                                        target.device)
    else:
        own = assistant.generation_config  # HF reads the draft length from the assistant's
        count = next((c for c in (own.num_assistant_tokens, config.num_assistant_tokens)
                      if c is not None), 20)
        drafter = drafters.DraftModel(
            assistant, prepared, opts.max_new_tokens, verifier,
            vocab=model.config.get_text_config().vocab_size, num_tokens=int(count),
            schedule=own.num_assistant_tokens_schedule or "constant", backend=backend)
    with target.session(), drafter.session():
        return speculative.run(target, drafter, verifier, opts, prepared.input_ids,
                               prepared.mask)
