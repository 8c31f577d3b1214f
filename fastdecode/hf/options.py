"""Resolve ``model.generate``'s arguments the way transformers does, and decide what fastdecode runs.

:func:`resolve` merges ``model.generation_config`` with the call's overrides through transformers'
own ``_prepare_generation_config`` (so defaults and precedence are HF's), validates the values with
HF's own processor constructors (so bad input raises HF's exception types), and lists the options
fastdecode does not implement (the caller then falls back to the original ``model.generate``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import generation as hfgen

# Generation-config attributes that only matter when they differ from these neutral values.
# Anything listed here and set to something else runs through the original model.generate.
_NEUTRAL = {
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0),
    "penalty_alpha": (None,), "dola_layers": (None,), "prompt_lookup_num_tokens": (None,),
    "guidance_scale": (None, 1.0), "sequence_bias": (None,), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "force_words_ids": (None,), "constraints": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,),
    "watermarking_config": (None,), "renormalize_logits": (None, False), "max_time": (None,),
    "output_attentions": (None, False), "output_hidden_states": (None, False),
    "token_healing": (None, False), "low_memory": (None, False), "use_cache": (None, True),
}
# Arguments of model.generate that select another decoding method.
OTHER_METHODS = ("prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids",
                  "negative_prompt_attention_mask", "custom_generate", "synced_gpus",
                  "assistant_tokenizer", "past_key_values", "inputs_embeds", "position_ids",
                  "token_type_ids", "cache_position")


@dataclass
class Options:
    """Everything the decoding loop needs, resolved as HF would."""

    max_new_tokens: int
    min_length: int  # total length (prompt + new) below which EOS is forbidden
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    eos: Optional[list[int]]
    pad: Optional[int]
    num_return_sequences: int
    stop_strings: Optional[object]
    return_dict: bool
    output_scores: bool
    output_logits: bool


def _value(config, name):
    return getattr(config, name, None)


def unsupported(config, extra_kwargs: dict) -> list[str]:
    """Names of the requested options fastdecode does not implement."""
    names = [k for k, neutral in _NEUTRAL.items() if _value(config, k) not in neutral]
    names += [k for k, v in extra_kwargs.items() if v is not None]
    return names


def resolve(model, input_len: int, generation_config, kwargs: dict) -> tuple[Options, object, dict]:
    """(Options, the merged GenerationConfig, leftover model kwargs) for a prompt of ``input_len``.

    Raises what HF raises for invalid values (ValueError from its processor constructors).
    """
    has_default_max = (kwargs.get("max_length") is None
                       and (generation_config is None or generation_config.max_length is None)
                       and model.generation_config.max_length is None)
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    max_length = config.max_length
    if config.max_new_tokens is not None:
        max_length = config.max_new_tokens + input_len
    elif has_default_max:
        max_length = max_length + input_len
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        max_length = min(max_length, limit) if limit is not None else max_length
    if input_len >= max_length:
        raise ValueError(f"Input length of input_ids is {input_len}, but `max_length` is set to "
                         f"{max_length}. This can lead to unexpected behavior. You should consider "
                         "increasing `max_length` or, better yet, setting `max_new_tokens`.")
    min_length = config.min_length or 0
    if config.min_new_tokens is not None:  # wins over min_length, as in HF
        min_length = config.min_new_tokens + input_len
    eos = config.eos_token_id
    eos = None if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else
                                                     torch.as_tensor(eos).flatten().tolist())]
    pad = config.pad_token_id
    if pad is None and eos:
        pad = eos[0]
    opts = Options(
        max_new_tokens=max_length - input_len, min_length=min_length,
        do_sample=bool(config.do_sample), temperature=_float(config.temperature, 1.0),
        top_k=int(config.top_k or 0), top_p=_float(config.top_p, 1.0),
        min_p=_float(config.min_p, 0.0), repetition_penalty=_float(config.repetition_penalty, 1.0),
        eos=eos or None, pad=None if pad is None else int(pad),
        num_return_sequences=int(config.num_return_sequences or 1),
        stop_strings=config.stop_strings, return_dict=bool(config.return_dict_in_generate),
        output_scores=bool(config.output_scores), output_logits=bool(config.output_logits))
    _validate(opts, config)
    return opts, config, model_kwargs


def _float(value, default: float) -> float:
    return default if value is None else float(value)


def _validate(opts: Options, config) -> None:
    """Raise exactly where HF raises: its processors validate the raw config values when built
    (e.g. an int temperature or penalty is rejected), under the conditions HF builds them."""
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        hfgen.RepetitionPenaltyLogitsProcessor(config.repetition_penalty)
    if opts.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            hfgen.TemperatureLogitsWarper(config.temperature)
        if config.top_k is not None and config.top_k != 0:
            hfgen.TopKLogitsWarper(top_k=config.top_k)
        if config.top_p is not None and config.top_p < 1.0:
            hfgen.TopPLogitsWarper(top_p=config.top_p)
        if config.min_p is not None:
            hfgen.MinPLogitsWarper(min_p=config.min_p)
    elif opts.num_return_sequences > 1:
        raise ValueError("Greedy methods (do_sample != True) without beam search do not support "
                         f"`num_return_sequences` different than 1 (got "
                         f"{opts.num_return_sequences}).")


@functools.lru_cache(maxsize=None)
def penalty_skips_padding() -> bool:
    """Whether this transformers' repetition penalty ignores left padding.

    Newer releases pass ``prompt_ignore_length`` (the padding length) to the processor, older ones
    (e.g. 5.17) penalise the pad id like any prompt token; fastdecode follows the installed one.
    """
    source = inspect.getsource(hfgen.GenerationMixin._get_logits_processor)
    return "prompt_ignore_length" in source
