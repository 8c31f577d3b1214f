"""``fastdecode.generate`` / ``patch`` / ``unpatch``: a drop-in ``model.generate``.

Same arguments, defaults, return types and output layout as ``model.generate`` for greedy and
sampling decoding; the model runs over fastdecode's paged KV cache (or, for architectures whose
attention does not go through ``AttentionInterface``, over its own cache) and tokens are chosen by
fastdecode's sampling ops. Anything else falls back to the original ``model.generate`` with one
warning naming the options responsible (or raises with ``fallback="error"``).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from transformers.generation import GenerateDecoderOnlyOutput, StopStringCriteria

from fastdecode.hf import options as _options
from fastdecode.hf.runner import has_unsupported_attention, uses_attention_interface
from fastdecode.hf.sampling import TokenSelector
from fastdecode.hf.steppers import CacheStepper, PagedStepper

_ORIGINAL = "_fastdecode_original_generate"


class FallbackError(ValueError):
    """Raised with ``fallback="error"`` when a request needs the original ``model.generate``."""


def generate(model, input_ids=None, attention_mask=None, generation_config=None, streamer=None,
             logits_processor=None, stopping_criteria=None, tokenizer=None, *,
             fallback: str = "hf", backend: str = "auto", **kwargs):
    """Drop-in ``model.generate(input_ids, attention_mask=..., **kwargs)`` (decoder-only models).

    input_ids: [B, L] int64 (left padding); attention_mask: [B, L] (1 = token, 0 = padding).
    Returns a LongTensor [B * num_return_sequences, L + new] (finished rows padded with
    pad_token_id) or a ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``.
    fallback: "hf" (run unsupported requests through model.generate, warning once) or "error".
    backend: fastdecode ops backend ("auto" picks the best for the model's device).
    """
    if fallback not in ("hf", "error"):
        raise ValueError(f"fallback must be 'hf' or 'error', got {fallback!r}")
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    call = dict(attention_mask=attention_mask, generation_config=generation_config,
                streamer=streamer, logits_processor=logits_processor,
                stopping_criteria=stopping_criteria, **kwargs)
    if tokenizer is not None:
        call["tokenizer"] = tokenizer
    other = {k: kwargs.pop(k) for k in _options.OTHER_METHODS if k in kwargs}
    reasons = _structural_reasons(model, input_ids, attention_mask)
    if not reasons:
        opts, config, model_kwargs = _options.resolve(model, input_ids.shape[-1],
                                                      generation_config, kwargs)
        reasons = _options.unsupported(config, other) + sorted(model_kwargs)
    if reasons:
        if fallback == "error":
            raise FallbackError(f"fastdecode.generate does not implement: {', '.join(reasons)}")
        warnings.warn(f"fastdecode.generate: running model.generate instead, because of: "
                      f"{', '.join(reasons)}", stacklevel=2)
        return original_generate(model)(input_ids, **call)
    with torch.no_grad():
        return _decode(model, input_ids, attention_mask, opts, streamer, logits_processor,
                       stopping_criteria, tokenizer, backend)


def _structural_reasons(model, input_ids, attention_mask) -> list[str]:
    if getattr(model.config, "is_encoder_decoder", False):
        return ["encoder-decoder model (cross-attention)"]
    if input_ids is None:
        return ["no input_ids (inputs_embeds)"]
    if input_ids.dim() != 2:
        return [f"input_ids of shape {tuple(input_ids.shape)} (expected [batch, length])"]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            return [f"attention_mask of shape {tuple(attention_mask.shape)} (custom mask)"]
        if bool((attention_mask[:, -1] == 0).any()):
            return ["right-padded attention_mask"]
    return []


def _attention_mask(input_ids: torch.Tensor, opts: _options.Options) -> torch.Tensor:
    """HF's inference of a missing mask: pad tokens are padding unless pad is also EOS."""
    pad = opts.pad
    if pad is not None and pad not in (opts.eos or []) and bool((input_ids == pad).any()):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


def _decode(model, input_ids, attention_mask, opts, streamer, logits_processor,
            stopping_criteria, tokenizer, backend):
    if attention_mask is None:
        attention_mask = _attention_mask(input_ids, opts)
    n = opts.num_return_sequences
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    criteria = list(stopping_criteria or [])
    if opts.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("There are one or more stop strings, either in the arguments to "
                             "`generate` or in the model's generation config, but we could not "
                             "locate a tokenizer. When generating with stop strings, you must pass "
                             "the model's tokenizer to the `tokenizer` argument of `generate`.")
        criteria.append(StopStringCriteria(stop_strings=opts.stop_strings, tokenizer=tokenizer))
    want_scores = opts.return_dict and opts.output_scores
    selector = TokenSelector(opts, logits_processor, want_scores or bool(stopping_criteria),
                             backend)
    total = input_ids.shape[1] + opts.max_new_tokens
    if uses_attention_interface(model) and has_unsupported_attention(model) is None:
        stepper = PagedStepper(model, input_ids.shape[0], total, backend=backend)
    else:
        stepper = CacheStepper(model)
    with stepper.session():
        sequences, scores, logits = _loop(stepper, selector, criteria, opts, streamer, input_ids,
                                          attention_mask)
    if streamer is not None:
        streamer.end()
    if not opts.return_dict:
        return sequences
    return GenerateDecoderOnlyOutput(
        sequences=sequences, scores=tuple(scores) if opts.output_scores else None,
        logits=tuple(logits) if opts.output_logits else None)


def _loop(stepper, selector, criteria, opts, streamer, input_ids, attention_mask):
    """Prefill, then one token per step until every row finished or the length limit.

    Returns (sequences [B, L + new], per-step processed scores, per-step raw logits).
    """
    batch, cur = input_ids.shape
    device = input_ids.device
    seqs = torch.full((batch, cur + opts.max_new_tokens),
                      opts.pad if opts.pad is not None else 0, dtype=torch.long, device=device)
    seqs[:, :cur] = input_ids
    seen = None
    if opts.repetition_penalty != 1.0:  # the penalty's id set: prompt (+ padding?) + new tokens
        seen = seqs.clone()
        if _options.penalty_skips_padding():
            seen[:, :cur] = torch.where(attention_mask.bool(), input_ids, -1)
    eos = torch.tensor(opts.eos, device=device) if opts.eos else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    scores_out, logits_out = [], []
    logits = stepper.prefill(input_ids, attention_mask)
    while True:
        tokens, scores = selector(logits, seqs[:, :cur], seen[:, :cur] if seen is not None else None,
                                  ban_eos=eos is not None and cur < opts.min_length)
        if opts.return_dict:
            scores_out.append(scores)
            logits_out.append(logits)
        invalid = (tokens < 0).any()
        if eos is not None:  # finished rows get padding, as in HF
            tokens = torch.where(unfinished, tokens, opts.pad)
        seqs[:, cur] = tokens
        if seen is not None:
            seen[:, cur] = tokens
        cur += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
        for criterion in criteria:
            unfinished &= ~criterion(seqs[:, :cur], scores if scores is not None else logits)
        running, bad = torch.stack([unfinished.any(), invalid]).tolist()  # the one host sync
        if bad:
            raise ValueError("sampling found no valid token (NaN logits, or every token "
                             "filtered out) in at least one row")
        if not running or cur == seqs.shape[1]:
            return seqs[:, :cur], scores_out, logits_out
        logits = stepper.decode(tokens)


def original_generate(model):
    """The model's own ``generate`` (bound), also while the model is patched."""
    saved = model.__dict__.get(_ORIGINAL)
    if saved is not None:
        return saved
    return model.generate


def patch(model):
    """Make ``model.generate`` run :func:`generate`; returns the model. Idempotent."""
    if _ORIGINAL in model.__dict__:
        return model
    original = model.generate
    signature = inspect.signature(original)

    @functools.wraps(original)
    def patched(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        input_ids = bound.pop("inputs", None)
        return generate(model, input_ids, **bound, **extra)

    model.__dict__[_ORIGINAL] = original
    model.generate = patched
    return model


def unpatch(model):
    """Undo :func:`patch` (no-op on a model that is not patched); returns the model."""
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is not None:
        if getattr(original, "__self__", None) is model and original.__func__ is getattr(
                type(model), "generate", None):
            del model.generate  # the class method shows through again
        else:
            model.generate = original
    return model
