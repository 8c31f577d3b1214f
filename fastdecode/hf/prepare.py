"""The first half of ``model.generate``: arguments -> prompt tensors, model kwargs and final config.

:func:`prepare` runs the same preparation steps as ``GenerationMixin.generate`` of the installed
transformers, in the same order and through the model's own helper methods, so that defaults,
precedence, validation errors, the inferred attention mask, position ids, length limits, special
tokens and the cache object are exactly HF's. Only the decoding loop is fastdecode's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

from fastdecode.hf import compat


@dataclass
class Prepared:
    """What the decoding loop starts from (B rows after ``num_return_sequences`` expansion).

    input_ids: [B, L] int64 (L may be 0 when only ``inputs_embeds`` were given); for
      encoder-decoder models, the decoder's ids (``decoder_input_ids`` or the start token).
    mask: [B, S] int64, the full 2-D attention mask of the prompt (S = L, or the length of the
      embeddings), also where ``model_kwargs["attention_mask"]`` was dropped because it is all ones;
      for encoder-decoder models, ones [B, L] (``model_kwargs`` keeps the encoder's mask and
      ``encoder_outputs``).
    model_kwargs: what HF's loop would feed the model (attention_mask, position_ids, cache, ...).
    config: the final ``GenerationConfig`` (max_length / min_length resolved, special tokens set).
    mode: HF's ``GenerationMode``; mode_kwargs: tokenizer, streamer, assistant model, synced_gpus.
    inputs_tensor: the main model input before expansion (ids or embeddings).
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    model_kwargs: dict[str, Any]
    config: Any
    mode: Any
    mode_kwargs: dict[str, Any]
    model_input_name: str
    inputs_tensor: torch.Tensor


def _has_default(name: str, kwargs: dict, generation_config, model) -> bool:
    return (kwargs.get(name) is None
            and (generation_config is None or getattr(generation_config, name) is None)
            and getattr(model.generation_config, name) is None)


def prepare(model, inputs: Optional[torch.Tensor] = None, generation_config=None, *,
            synced_gpus=None, assistant_model=None, streamer=None, **kwargs) -> Prepared:
    """Steps 1-7 of ``model.generate(inputs, generation_config, ..., **kwargs)``; raises what HF
    raises for invalid arguments. ``kwargs`` holds every other argument (model kwargs, generation
    options, ``tokenizer``). The model's cache is created (empty) but nothing runs the model."""
    kwargs.pop("trust_remote_code", None)
    mode_kwargs = model._extract_generation_mode_kwargs(None, kwargs, synced_gpus,
                                                        assistant_model, streamer)
    default_max = _has_default("max_length", kwargs, generation_config, model)
    default_min = _has_default("min_length", kwargs, generation_config, model)
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    mode = config.get_generation_mode(assistant_model)
    model._validate_model_kwargs(model_kwargs.copy())
    model._validate_generation_mode(mode, config, mode_kwargs)

    forward_params = inspect.signature(model.forward).parameters
    has_mask = model_kwargs.get("attention_mask") is not None
    inputs_tensor, input_name, model_kwargs = model._prepare_model_inputs(
        inputs, config.bos_token_id, model_kwargs)
    model._prepare_special_tokens(config, has_mask, device=inputs_tensor.device,
                                  batch_size=inputs_tensor.shape[0])
    # Encoder-decoder models: the mask and the inputs are the encoder's (HF infers no mask,
    # no position ids, and keeps the mask as it is).
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    if input_name == "inputs_embeds" and not encdec:
        config.use_cache = True
    if not has_mask and not encdec and "attention_mask" in forward_params:
        model_kwargs["attention_mask"] = model._prepare_attention_mask_for_generation(
            inputs_tensor, config, model_kwargs)
    elif has_mask and input_name == "input_ids" and model_kwargs["attention_mask"].dim() > 2:
        raise ValueError("`attention_mask` passed to `generate` must be 2D.")
    if (model_kwargs.get("position_ids") is None and "position_ids" in forward_params
            and not encdec):
        model_kwargs["position_ids"] = model._prepare_position_ids_for_generation(
            inputs_tensor, model_kwargs)
    if encdec:
        input_ids, model_kwargs = _encode(model, config, inputs_tensor, input_name, model_kwargs)
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    else:
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(inputs_tensor.shape[:2], dtype=torch.long,
                              device=inputs_tensor.device)
        elif compat.drops_all_ones_mask() and bool((mask == 1).all()):
            config._mask_length = mask.shape[1]
            model_kwargs["attention_mask"] = None
        input_ids = inputs_tensor if input_name == "input_ids" else model_kwargs.pop("input_ids")
    expand = max(config.num_beams or 1, config.num_return_sequences or 1)
    input_ids, model_kwargs = model._expand_inputs_for_generation(
        input_ids=input_ids, expand_size=expand, is_encoder_decoder=encdec, **model_kwargs)
    if expand > 1:
        mask = mask.repeat_interleave(expand, dim=0)
    length = input_ids.shape[1]
    config = model._prepare_generated_length(
        generation_config=config, has_default_max_length=default_max,
        has_default_min_length=default_min, model_input_name=input_name,
        inputs_tensor=inputs_tensor, input_ids_length=length)
    if model._supports_logits_to_keep() and "logits_to_keep" not in model_kwargs:
        model_kwargs["logits_to_keep"] = 1
    model._validate_generated_length(config, length, default_max)
    return Prepared(input_ids=input_ids, mask=mask.long(), model_kwargs=model_kwargs,
                    config=config, mode=mode, mode_kwargs=mode_kwargs, model_input_name=input_name,
                    inputs_tensor=inputs_tensor)


def _encode(model, config, inputs_tensor: torch.Tensor, input_name: str,
            model_kwargs: dict) -> tuple[torch.Tensor, dict]:
    """Step 4-5 of ``generate`` for encoder-decoder models: run the encoder (unless
    ``encoder_outputs`` were passed in) -> (decoder input ids [B, L], model kwargs with
    ``encoder_outputs``; ``attention_mask`` stays the encoder's)."""
    model_kwargs = model._maybe_prepare_encoder_kwargs_for_generation(
        inputs_tensor, model_kwargs, input_name, config)
    return model._prepare_decoder_input_ids_for_generation(
        batch_size=inputs_tensor.shape[0], model_input_name=input_name, model_kwargs=model_kwargs,
        decoder_start_token_id=config._decoder_start_token_tensor, device=inputs_tensor.device)


def prepare_cache(model, prepared: Prepared) -> None:
    """Step 7 of ``generate``: put HF's cache object for this call into the model kwargs (an empty
    ``DynamicCache`` unless the caller passed one; nothing when ``use_cache=False``)."""
    config = prepared.config
    max_cache_length = config.max_length - 1
    if (prepared.model_input_name == "inputs_embeds"
            and prepared.inputs_tensor.shape[1] != prepared.input_ids.shape[1]):
        max_cache_length += prepared.inputs_tensor.shape[1]
    model._prepare_cache_for_generation(config, prepared.model_kwargs, prepared.mode,
                                        prepared.inputs_tensor.shape[0], max_cache_length)
    prepared.model_kwargs["use_cache"] = config.use_cache
