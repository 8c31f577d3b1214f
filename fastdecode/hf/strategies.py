"""Decoding strategies beyond one token per step: speculative decoding (``assistant_model`` /
``prompt_lookup_num_tokens``).

:func:`reasons` lists what of a call the strategy does not run (the call then falls back like any
other unsupported request); :func:`decode` runs it. Both are reached only when the call asks for
the strategy (:func:`requested`).
"""

from __future__ import annotations

import torch
from transformers.generation import GenerationMode

from fastdecode.hf import drafters, speculative
from fastdecode.hf.options import Options
from fastdecode.hf.prepare import Prepared
from fastdecode.hf.runner import has_unsupported_attention, uses_attention_interface
from fastdecode.hf.steppers import PagedStepper


def requested(prepared: Prepared) -> bool:
    return prepared.mode == GenerationMode.ASSISTED_GENERATION


def reasons(prepared: Prepared, opts: Options, paged: bool, streamer, logits_processor) -> list[str]:
    """What of this speculative call fastdecode does not run natively."""
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
              "min_length / min_new_tokens": opts.min_length > prepared.input_ids.shape[1],
              "remove_invalid_values": opts.remove_invalid_values,
              "return_dict_in_generate": opts.return_dict, "streamer": streamer is not None,
              "logits_processor": bool(logits_processor), "stopping_criteria": bool(opts.criteria),
              "inputs_embeds / token_type_ids": any(
                  prepared.model_kwargs.get(k) is not None
                  for k in ("inputs_embeds", "token_type_ids"))}
    why += [f"{name} with speculative decoding" for name, on in extras.items() if on]
    return why


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
