"""``fastdecode.generate``: a drop-in ``model.generate`` for decoder-only models.

Same arguments, defaults, return types and output layout as ``model.generate`` for greedy and
sampling decoding. The call is prepared by HF's own steps (:mod:`fastdecode.hf.prepare`); the model
then runs over fastdecode's paged KV cache (:class:`~fastdecode.hf.steppers.PagedStepper`) or, when
the call needs HF's own masks and cache (masked columns within a sliding window, positions
derived from the mask, a cache passed in, hidden states, attention outside
``AttentionInterface``, a forward compiled by ``compile_config``), through HF's model-feeding
helpers (:class:`~fastdecode.hf.steppers.CacheStepper`); tokens are always chosen by fastdecode's loop and
sampling ops. Anything else falls back to the original ``model.generate`` with one warning naming
the options responsible (or raises with ``fallback="error"``).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
from transformers.generation import (GenerateBeamDecoderOnlyOutput,
                                    GenerateBeamEncoderDecoderOutput, GenerateDecoderOnlyOutput,
                                    GenerateEncoderDecoderOutput, GenerationMixin, GenerationMode)

from fastdecode.hf import compat, contrastive_decoding, loop, seq2seq, strategies
from fastdecode.hf import options as _options
from fastdecode.hf.beam import BeamSearch
from fastdecode.hf.beam_cache import BeamKV
from fastdecode.hf.beam_constrained import ConstrainedBeamSearch, check_constraints, constrained
from fastdecode.hf.beam_groups import GroupBeamSearch, check_groups
from fastdecode.hf.patching import original_generate
from fastdecode.hf.prepare import Prepared, prepare, prepare_cache
from fastdecode.hf.runner import has_unsupported_attention, uses_attention_interface
from fastdecode.hf.sampling import TokenSelector
from fastdecode.hf.steppers import CacheStepper, PagedStepper


class FallbackError(ValueError):
    """Raised with ``fallback="error"`` when a request needs the original ``model.generate``."""


def generate(model, input_ids=None, attention_mask=None, generation_config=None, streamer=None,
             logits_processor=None, stopping_criteria=None, tokenizer=None, *,
             fallback: str = "hf", backend: str = "auto", **kwargs):
    """Drop-in ``model.generate(input_ids, attention_mask=..., **kwargs)`` (decoder-only models).

    input_ids: [B, L] int64 (also accepted as ``inputs=``, as ``model.generate`` names it);
    attention_mask: [B, L] (1 = token, 0 = padding, anywhere). Every other argument of
    ``model.generate`` is accepted: generation options, ``inputs_embeds``, ``position_ids``,
    ``token_type_ids``, ``past_key_values`` / ``cache``, ``logits_to_keep``, ...
    Returns a LongTensor [B * num_return_sequences, L + new] (finished rows padded with
    pad_token_id) or a ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``.
    Speculative decoding (``assistant_model``, ``prompt_lookup_num_tokens``) and contrastive
    search (``penalty_alpha`` with ``top_k``) run natively; ``amateur_model=`` (with
    ``contrastive_alpha``, ``plausibility``) selects contrastive decoding, which only fastdecode
    implements (:mod:`fastdecode.hf.contrastive_decoding`: such a call never falls back).
    fallback: "hf" (run unsupported requests through model.generate, warning once) or "error".
    backend: fastdecode ops backend ("auto" picks the best for the model's device).
    """
    if fallback not in ("hf", "error"):
        raise ValueError(f"fallback must be 'hf' or 'error', got {fallback!r}")
    contrast = contrastive_decoding.pop_options(kwargs)
    call = dict(kwargs, generation_config=generation_config, streamer=streamer,
                logits_processor=logits_processor, stopping_criteria=stopping_criteria)
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                        ("tokenizer", tokenizer)):
        if value is not None:
            call[name] = value
    reasons = _structural_reasons(model, call)
    if not reasons:
        prepared = prepare(model, **_prepare_arguments(call))
        if prepared.mode_kwargs.get("synced_gpus"):
            reasons.append("synced_gpus")
        more, criteria = _options.unsupported(model, prepared, logits_processor,
                                              stopping_criteria, tokenizer)
        reasons += more
        if not reasons:
            user_cache = prepared.model_kwargs.get(compat.cache_name()) is not None
            compiled = _hf_compiles(model, prepared)
            paged = not compiled and _paged(model, prepared, user_cache)
            if _encoder_decoder(model):
                reasons += _encoder_decoder_reasons(prepared, paged, contrast)
            if compiled and prepared.mode not in _options.PLAIN_MODES:
                reasons.append(f"compile_config with generation mode {prepared.mode.value}")
            elif (prepared.config.num_beams or 1) > 1 and not paged:
                reasons.append("num_beams > 1 with inputs only HF's cache takes (masked columns "
                               "within a sliding window, positions the model derives from the "
                               "mask, a cache passed in, hidden states, attention outside "
                               "AttentionInterface)")
            else:
                reasons += strategies.reasons(prepared, _options.options(prepared, criteria),
                                              paged, streamer, logits_processor)
    if not reasons and contrast is not None and prepared.mode not in _options.PLAIN_MODES:
        reasons.append(f"amateur_model with generation mode {prepared.mode.value}")
    if reasons:
        if fallback == "error" or contrast is not None:  # HF has no contrastive decoding
            raise FallbackError(f"fastdecode.generate does not implement: {'; '.join(reasons)}")
        warnings.warn(f"fastdecode.generate: running model.generate instead, because of: "
                      f"{'; '.join(reasons)}", stacklevel=2)
        return original_generate(model)(**call)
    opts = _options.options(prepared, criteria)
    with torch.no_grad():
        if strategies.speculative_call(prepared):
            return strategies.decode(model, prepared, opts, backend)
        return _decode(model, prepared, opts, streamer, logits_processor, backend, contrast,
                       paged, compiled)


def _structural_reasons(model, call: dict) -> list[str]:
    if _encoder_decoder(model):
        reason = seq2seq.unsupported_reason(model)
        if reason:
            return [f"encoder-decoder model ({reason})"]
    if type(model).generate is not GenerationMixin.generate:  # its own preparation steps
        return [f"{type(model).__name__}.generate (a model-specific generate)"]
    return [name for name in _options.OTHER_METHODS if call.get(name) is not None]


def _prepare_arguments(call: dict) -> dict:
    """The arguments of :func:`prepare`: the call less what it does not take, with a cache passed
    under the deprecated name ``past_key_values`` renamed as this release's ``generate`` does."""
    skip = ("logits_processor", "stopping_criteria", *_options.OTHER_METHODS)
    args = {k: v for k, v in call.items() if k not in skip}
    name = compat.cache_name()
    if name != "past_key_values" and "past_key_values" in args:
        if args.get(name) is not None:
            raise ValueError(f"You cannot specify both `{name}` and `past_key_values`. "
                             f"Use `{name}` only.")
        args[name] = args.pop("past_key_values")
    return args


def _encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


# Generation modes encoder-decoder models run natively (the others: fallback).
_SEQ2SEQ_MODES = (*_options.PLAIN_MODES, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE,
                  GenerationMode.GROUP_BEAM_SEARCH)


def _encoder_decoder_reasons(prepared: Prepared, paged: bool, contrast) -> list[str]:
    if prepared.mode not in _SEQ2SEQ_MODES:
        return [f"generation mode {prepared.mode.value} with an encoder-decoder model"]
    if contrast is not None:
        return ["amateur_model with an encoder-decoder model"]
    if not paged:
        return ["an encoder-decoder call only HF's cache takes (decoder masks or embeddings, a "
                "cache passed in, hidden states)"]
    return []


def _penalty_mask(model, prepared: Prepared) -> Optional[torch.Tensor]:
    """The mask HF's repetition penalty reads its ``prompt_ignore_length`` from."""
    return prepared.model_kwargs.get("decoder_attention_mask" if _encoder_decoder(model)
                                     else "attention_mask")


def _left_padded(mask: torch.Tensor) -> bool:
    """Every row is zeros then at least one one (no holes, no padding on the right)."""
    return bool(mask[:, -1].all() and (mask[:, 1:] >= mask[:, :-1]).all())


# Model kwargs the paged path feeds itself (anything else needs HF's own model feeding).
_PAGED_KWARGS = {"attention_mask", "position_ids", "inputs_embeds", "use_cache", "logits_to_keep",
                 "token_type_ids", *compat.cache_names()}
# Those of an encoder-decoder model (attention_mask: the encoder's).
_PAGED_SEQ2SEQ_KWARGS = {"attention_mask", "encoder_outputs", "use_cache", *compat.cache_names()}


def _paged(model, prepared: Prepared, user_cache: bool) -> bool:
    """Whether the paged path reproduces this call exactly."""
    kwargs = prepared.model_kwargs
    if user_cache or prepared.config.output_hidden_states:
        return False
    if _encoder_decoder(model):
        return not set(kwargs) - _PAGED_SEQ2SEQ_KWARGS
    if (not uses_attention_interface(model) or has_unsupported_attention(model)
            or set(kwargs) - _PAGED_KWARGS):
        return False
    if not isinstance(kwargs.get("logits_to_keep", 1), int):
        return False
    if (kwargs.get("token_type_ids") is not None
            and "token_type_ids" not in inspect.signature(model.forward).parameters):
        return False
    width = prepared.input_ids.shape[1]
    if width not in (0, prepared.mask.shape[1]):
        return False
    return _left_padded(prepared.mask) or _masked_tokens_droppable(model, prepared)


def _masked_tokens_droppable(model, prepared: Prepared) -> bool:
    """Whether a mask with zeros after a one (right padding, holes) gives HF's tokens on the
    paged path, which drops the masked tokens: no later query attends to them in HF either, the
    positions are HF's own ``position_ids`` (a model computing them from the mask would count
    differently), no sliding window can reach back across them (HF's window counts columns,
    masked ones included: the whole call must fit in it) and every row keeps a token. A returned
    cache keeps HF's columns (the masked ones zero)."""
    config, mask = prepared.config, prepared.mask
    if prepared.model_kwargs.get("position_ids") is None or not bool(mask.any(-1).all()):
        return False
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    # max_length bounds the new tokens (it may count the prompt too: an overestimate is safe).
    return window is None or mask.shape[1] + config.max_length <= window


def _hf_compiles(model, prepared: Prepared) -> bool:
    """Whether ``model.generate`` would compile the model's forward for this call: a
    ``compile_config`` whose criteria (device, a compilable cache...) hold, judged by HF's own
    check. HF's cache for the call is prepared first (the criteria read it) whenever a
    ``compile_config`` is set."""
    if prepared.config.compile_config is None:
        return False
    prepare_cache(model, prepared)
    return bool(model._valid_auto_compile_criteria(prepared.model_kwargs, prepared.config))


def _decode(model, prepared: Prepared, opts: _options.Options, streamer, logits_processor,
            backend: str, contrast: Optional[contrastive_decoding.Contrast], paged: bool,
            compiled: bool):
    """Greedy / sampling / contrastive search (``paged``: on the paged cache, else fed as HF
    feeds the model; ``compiled``: decode steps through HF's compiled forward, as HF runs them)."""
    cache_ready = prepared.config.compile_config is not None  # _hf_compiles prepared it
    if opts.num_beams > 1 or constrained(opts):
        return _decode_beams(model, prepared, opts, streamer, logits_processor, backend,
                             cache_ready)
    # The paged path fills HF's cache only to return it.
    if (not paged or opts.return_dict) and not cache_ready:
        prepare_cache(model, prepared)
    input_ids = prepared.input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())
    contrastive = strategies.contrastive_call(prepared)
    selector = TokenSelector(opts, logits_processor,
                             contrastive or (opts.return_dict and opts.output_scores), backend)
    if contrastive:
        stepper, selector = strategies.contrastive_parts(model, prepared, opts, selector, backend)
    elif paged:
        stepper = PagedStepper(model, prepared, opts.max_new_tokens, backend=backend)
    else:
        stepper = CacheStepper(model, prepared, model.get_compiled_call(
            prepared.config.compile_config) if compiled else None)
    if contrast is not None:
        stepper = contrastive_decoding.ContrastStepper(stepper, prepared, opts.max_new_tokens,
                                                       contrast, backend)
    with stepper.session():
        result = loop.run(stepper, selector, opts, streamer, input_ids,
                          _penalty_mask(model, prepared))
    if streamer is not None:
        streamer.end()
    if not opts.return_dict:
        return result.sequences
    fields = dict(sequences=result.sequences,
                  scores=tuple(result.scores) if opts.output_scores else None,
                  logits=tuple(result.logits) if opts.output_logits else None,
                  hidden_states=tuple(result.hidden_states) if opts.output_hidden_states else None)
    fields[compat.output_cache_field()] = stepper.cache()
    if _encoder_decoder(model):
        return GenerateEncoderDecoderOutput(**_encoder_fields(fields, prepared))
    return GenerateDecoderOnlyOutput(**fields)


def _decode_beams(model, prepared: Prepared, opts: _options.Options, streamer, logits_processor,
                  backend: str, cache_ready: bool):
    """Beam search / beam sampling on the paged cache (the caller checked it takes the call);
    cache_ready: HF's cache object of the call is already prepared."""
    forced = None
    if constrained(opts):
        forced = check_constraints(opts, model.config.get_text_config().vocab_size, streamer,
                                   prepared.input_ids.device)
    elif opts.num_beam_groups > 1:
        check_groups(opts, streamer)
    elif streamer is not None:  # model.generate sends the prompt, then streams no beam
        streamer.put(prepared.input_ids.cpu())
    if opts.return_dict and not cache_ready:
        prepare_cache(model, prepared)
    kv = BeamKV(model, prepared, opts.num_beams, opts.max_new_tokens, backend=backend)
    selector = TokenSelector(opts, logits_processor, True, backend)
    if forced is not None:
        search = ConstrainedBeamSearch(kv, selector, opts, forced)
    elif opts.num_beam_groups > 1:
        search = GroupBeamSearch(kv, selector, opts)
    else:
        search = BeamSearch(kv, selector, opts)
    with kv.session():
        result = search.run(prepared.input_ids, _penalty_mask(model, prepared))
    if not opts.return_dict:
        return result.sequences
    fields = dict(sequences=result.sequences, beam_indices=result.beam_indices,
                  sequences_scores=result.sequences_scores if opts.output_scores else None,
                  scores=tuple(result.scores) if opts.output_scores else None,
                  logits=tuple(result.logits) if opts.output_logits else None)
    fields[compat.output_cache_field()] = kv.cache()
    if _encoder_decoder(model):
        return GenerateBeamEncoderDecoderOutput(**_encoder_fields(fields, prepared))
    return GenerateBeamDecoderOnlyOutput(**fields)


def _encoder_fields(fields: dict, prepared: Prepared) -> dict:
    """A decoder-only output's fields as HF's encoder-decoder output names them, with the
    encoder's hidden states / attentions when the call asked for them."""
    config, encoder = prepared.config, prepared.model_kwargs["encoder_outputs"]
    fields = dict(fields, decoder_hidden_states=fields.pop("hidden_states", None))
    fields["encoder_hidden_states"] = (encoder.get("hidden_states")
                                       if config.output_hidden_states else None)
    fields["encoder_attentions"] = (encoder.get("attentions") if config.output_attentions
                                    else None)
    return fields
