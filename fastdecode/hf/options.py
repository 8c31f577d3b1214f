"""What the decoding loop needs from a prepared ``generate`` call, and what fastdecode does not run.

:func:`options` reads the final ``GenerationConfig`` (after :func:`fastdecode.hf.prepare.prepare`)
into :class:`Options`. :func:`unsupported` lists the requested features fastdecode leaves to the
original ``model.generate``: it builds HF's own logits-processor and stopping-criteria lists for the
call (which also validates their arguments exactly as HF does) and checks every entry against what
fastdecode implements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import generation as hfgen
from transformers.generation import GenerationMode
from transformers.generation import configuration_utils as hfconfig

from fastdecode.hf.prepare import Prepared

# Generation-config attributes that only matter when they differ from these neutral values.
# Anything listed here and set to something else runs through the original model.generate.
_NEUTRAL = {
    "dola_layers": (None,), "guidance_scale": (None, 1.0), "sequence_bias": (None,),
    "encoder_no_repeat_ngram_size": (None, 0), "encoder_repetition_penalty": (None, 1.0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,),
    "watermarking_config": (None,), "renormalize_logits": (None, False),
    "output_attentions": (None, False), "token_healing": (None, False), "low_memory": (None, False),
    "prefill_chunk_size": (None,), "use_mtp": (None, False), "speculation_type": (None,),
    "is_assistant": (None, False),  # the draft model of assisted decoding: HF drives its cache
}
# Cache layouts whose values equal the dynamic cache's: the paged cache gives the same tokens (the
# static ones preallocate and allow compilation, the offloaded ones keep layers on the CPU), and the
# cache ``return_dict_in_generate`` returns is HF's of the kind asked for. Read from the release
# (the static list grows deprecated aliases); "quantized" is lossy and "paged" is HF's continuous
# batching: those two run through the original model.generate.
_SAME_VALUE_CACHES = (None, "dynamic", "offloaded",
                      *getattr(hfconfig, "ALL_STATIC_CACHE_IMPLEMENTATIONS",
                               getattr(hfconfig, "STATIC_CACHE_IMPLEMENTATIONS", ())))
# Arguments of model.generate that select another decoding method.
OTHER_METHODS = ("prefix_allowed_tokens_fn", "negative_prompt_ids",
                 "negative_prompt_attention_mask", "custom_generate", "assistant_tokenizer")
# Beam search, assisted generation and contrastive search run natively within limits
# (fastdecode.hf.strategies.reasons, fastdecode.hf.generate).
PLAIN_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
_NATIVE_MODES = (*PLAIN_MODES, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE,
                 GenerationMode.GROUP_BEAM_SEARCH, GenerationMode.CONSTRAINED_BEAM_SEARCH,
                 GenerationMode.ASSISTED_GENERATION,
                 GenerationMode.CONTRASTIVE_SEARCH)
# HF processors fastdecode implements itself (by class name: the classes move between modules).
_BUILT_IN = {"RepetitionPenaltyLogitsProcessor", "NoBadWordsLogitsProcessor",
             "NoRepeatNGramLogitsProcessor",
             "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
             "InfNanRemoveLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
             "TopPLogitsWarper", "MinPLogitsWarper"}
# Stopping criteria the loop implements itself; any other one is called as HF calls it.
_LOOP_CRITERIA = (hfgen.MaxLengthCriteria, hfgen.EosTokenCriteria)


@dataclass
class Options:
    """Everything the decoding loop needs, resolved as HF would.

    max_length: total length (prompt + new) at which generation stops (may be fractional, as HF
    allows); max_new_tokens: the new tokens that allows; min_length: total length below which EOS
    is forbidden; eos / pad: token ids (pad defaults to eos[0]); bad_words: HF's bad_words_ids
    without the single-token EOS entries; no_repeat_ngram_size: 0 = off; criteria: stopping
    criteria besides length and EOS. Beam search (``num_beams > 1``): early_stopping (True, False
    or "never"), length_penalty, num_return_sequences (the best beams returned per prompt);
    diverse beam search: num_beam_groups > 1, diversity_penalty > 0; constrained beam search:
    constraints / force_words_ids as given (checked by :mod:`fastdecode.hf.beam_constrained`).
    """

    max_length: float
    max_new_tokens: int
    min_length: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    eos: Optional[list[int]]
    pad: Optional[int]
    bad_words: Optional[list[list[int]]]
    no_repeat_ngram_size: int
    remove_invalid_values: bool
    return_dict: bool
    output_scores: bool
    output_logits: bool
    output_hidden_states: bool
    criteria: list
    num_beams: int = 1
    early_stopping: bool | str = False
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    constraints: Optional[list] = None
    force_words_ids: Optional[list] = None


def options(prepared: Prepared, criteria: list) -> Options:
    config = prepared.config
    length = prepared.input_ids.shape[1]
    eos = config._eos_token_tensor
    eos = None if eos is None else [int(e) for e in eos.flatten().tolist()]
    pad = config._pad_token_tensor
    bad = config.bad_words_ids
    if bad is not None and eos:  # HF's NoBadWordsLogitsProcessor never bans EOS on its own
        bad = [list(s) for s in bad if not (len(s) == 1 and s[0] in eos)]
    return Options(
        max_length=config.max_length, max_new_tokens=max(math.ceil(config.max_length - length), 0),
        min_length=int(config.min_length or 0), do_sample=bool(config.do_sample),
        temperature=_float(config.temperature, 1.0), top_k=int(config.top_k or 0),
        top_p=_float(config.top_p, 1.0), min_p=_float(config.min_p, 0.0),
        repetition_penalty=_float(config.repetition_penalty, 1.0),
        eos=eos or None, pad=None if pad is None else int(pad), bad_words=bad or None,
        no_repeat_ngram_size=int(config.no_repeat_ngram_size or 0),
        remove_invalid_values=bool(config.remove_invalid_values),
        return_dict=bool(config.return_dict_in_generate),
        output_scores=bool(config.output_scores), output_logits=bool(config.output_logits),
        output_hidden_states=bool(config.output_hidden_states), criteria=criteria,
        num_beams=int(config.num_beams or 1), early_stopping=config.early_stopping,
        length_penalty=_float(config.length_penalty, 1.0),
        num_return_sequences=int(config.num_return_sequences or 1),
        num_beam_groups=int(config.num_beam_groups or 1),
        diversity_penalty=_float(config.diversity_penalty, 0.0),
        constraints=config.constraints, force_words_ids=config.force_words_ids)


def _float(value, default: float) -> float:
    return default if value is None else float(value)


def unsupported(model, prepared: Prepared, logits_processor, stopping_criteria,
                tokenizer) -> tuple[list[str], list]:
    """(names of the requested features fastdecode does not run, the stopping criteria the loop
    must call). Raises what HF raises for invalid processor / criteria arguments."""
    config = prepared.config
    reasons = [k for k, neutral in _NEUTRAL.items() if getattr(config, k, None) not in neutral]
    if config.cache_implementation not in _SAME_VALUE_CACHES:
        reasons.append(f"cache_implementation={config.cache_implementation!r}")
    if prepared.mode not in _NATIVE_MODES and not reasons:
        reasons.append(f"generation mode {prepared.mode.value}")
    user = list(logits_processor or [])
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=prepared.input_ids.shape[1],
        encoder_input_ids=prepared.inputs_tensor, prefix_allowed_tokens_fn=None,
        logits_processor=hfgen.LogitsProcessorList(user), device=prepared.inputs_tensor.device,
        model_kwargs=prepared.model_kwargs)
    for processor in processors:
        name = type(processor).__name__
        if any(processor is p for p in user):
            if name in _BUILT_IN:  # HF puts it in the built-in's place instead of after them
                reasons.append(f"logits_processor {name} (replaces a built-in one)")
        elif name not in _BUILT_IN and not reasons:
            reasons.append(name)
    user_criteria = list(stopping_criteria or [])
    criteria = model._get_stopping_criteria(generation_config=config,
                                            stopping_criteria=hfgen.StoppingCriteriaList(
                                                user_criteria), tokenizer=tokenizer)
    extra = [c for c in criteria
             if not isinstance(c, _LOOP_CRITERIA) or any(c is u for u in user_criteria)]
    for c in extra:
        if isinstance(c, _LOOP_CRITERIA):
            reasons.append(f"stopping_criteria {type(c).__name__} (replaces a built-in one)")
    return reasons, extra
