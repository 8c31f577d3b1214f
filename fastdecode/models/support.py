"""Which models the native decoder step reproduces exactly (an explicit allow-list).

The native step (:mod:`fastdecode.models.llama`) re-implements the Llama decoder layer. A model
runs on it only when every part of its forward is one the step computes the same way; anything
else keeps transformers' own modules (:class:`fastdecode.hf.PagedRunner`'s general path).
:func:`unsupported_reason` says why a model is refused, in words, or returns None.
"""

from __future__ import annotations

from typing import Optional

import torch

# model_type -> the class-name prefix of the family's modules. Each family's layers are Llama's
# (pre-norm RMSNorm, rotary q/k, gated SiLU MLP); qwen2 adds q/k/v biases, qwen3 q/k RMSNorms,
# mistral and qwen2/3 sliding windows (passed to the paged kernel like the HF path passes them).
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# Rotary types whose frequencies are fixed at load time. "dynamic" and "longrope" recompute them
# from the sequence length inside the forward, which a table from ``inv_freq`` would miss.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "yarn", "llama3"})
# Encoder-decoder model_type -> (model class, decoder layer class, its attention, its norm) of
# the decoders :mod:`fastdecode.models.seq2seq` computes: T5 pre-norm blocks (RMSNorm, relative
# bias in the self-attention), BART / Marian post-norm layers (LayerNorm, learned or
# sinusoidal positions).
SEQ2SEQ_FAMILIES = {
    "t5": ("T5ForConditionalGeneration", "T5Block", "T5Attention", "T5LayerNorm"),
    "bart": ("BartForConditionalGeneration", "BartDecoderLayer", "BartAttention", "LayerNorm"),
    "marian": ("MarianMTModel", "MarianDecoderLayer", "MarianAttention", "LayerNorm"),
}


def _module_names(prefix: str) -> dict[str, str]:
    return {"model": f"{prefix}Model", "layer": f"{prefix}DecoderLayer",
            "attn": f"{prefix}Attention", "mlp": f"{prefix}MLP", "norm": f"{prefix}RMSNorm",
            "rotary": f"{prefix}RotaryEmbedding"}


def _overridden(module: torch.nn.Module) -> bool:
    """Hooks or an instance ``forward`` would change what the module computes."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or "forward" in module.__dict__)


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why the native step cannot run ``model`` exactly (a phrase), or None when it can.

    model: a transformers ``*ForCausalLM``. Checked once, when a runner is built; hooks added
    later on the model or its decoder are checked per call (:func:`hooked`).
    """
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return _seq2seq_reason(model, family)
    prefix = FAMILIES.get(family)
    if prefix is None or type(model).__name__ != f"{prefix}ForCausalLM":
        return f"{type(model).__name__} (model_type {family!r}) has no native step"
    names = _module_names(prefix)
    base = getattr(model, "model", None)
    if type(base).__name__ != names["model"]:
        return f"its decoder is a {type(base).__name__}, not a {names['model']}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r} (native: 'silu')"
    if (getattr(model, "tp_size", None) or 1) > 1:
        return "tensor parallelism"
    if model.training:
        return "training mode (dropout)"
    rope_type = getattr(base.rotary_emb, "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} (native: {sorted(STATIC_ROPE_TYPES)})"
    for module in model.modules():
        if _overridden(module):
            return f"a hook or forward override on {type(module).__name__}"
    expected = {"layer": names["layer"], "attn": names["attn"], "mlp": names["mlp"]}
    for layer in base.layers:
        found = {"layer": layer, "attn": layer.self_attn, "mlp": layer.mlp}
        for part, module in found.items():
            if type(module).__name__ != expected[part]:
                return f"a {type(module).__name__} where {expected[part]} is expected"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if family == "qwen3":
            norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
        if any(type(n).__name__ != names["norm"] for n in norms):
            return "a norm other than the family's RMSNorm"
        if len({float(n.variance_epsilon) for n in norms + [base.norm]}) > 1:
            return "RMSNorms with different epsilons"
    if type(base.norm).__name__ != names["norm"] or type(base.rotary_emb).__name__ != names[
            "rotary"]:
        return "a final norm or rotary embedding other than the family's"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return "scaled or soft-capped logits"
    return None


def _seq2seq_reason(model: torch.nn.Module, family: Optional[str]) -> Optional[str]:
    """:func:`unsupported_reason` for encoder-decoder models (their decoder and LM head)."""
    names = SEQ2SEQ_FAMILIES.get(family)
    if names is None or type(model).__name__ != names[0]:
        return f"{type(model).__name__} (model_type {family!r}) has no native step"
    _, layer_name, attn_name, norm_name = names
    if model.training:
        return "training mode (dropout)"
    decoder = model.get_decoder()
    for module in [model.lm_head, *decoder.modules()]:
        if _overridden(module):
            return f"a hook or forward override on {type(module).__name__}"
    layers = decoder.block if family == "t5" else decoder.layers
    norms, attns = [], []
    for layer in layers:
        if type(layer).__name__ != layer_name:
            return f"a {type(layer).__name__} where {layer_name} is expected"
        norms += [m for m in layer.modules() if "Norm" in type(m).__name__]
        attns += [m for m in layer.modules() if "Attention" in type(m).__name__
                  and not type(m).__name__.startswith("T5Layer")]
    if any(type(m).__name__ != attn_name for m in attns):
        return f"an attention other than {attn_name}"
    if family == "t5":
        norms.append(decoder.final_layer_norm)
        if any(m.has_relative_attention_bias for m in attns[2:]):
            return "a relative position bias per layer"
    elif getattr(decoder, "layer_norm", None) is not None:
        return "a final decoder LayerNorm (mBART-style pre-norm layers)"
    if any(type(n).__name__ != norm_name for n in norms):
        return f"a norm other than {norm_name}"
    eps = {float(getattr(n, "eps", getattr(n, "variance_epsilon", 0.0))) for n in norms}
    if len(eps) > 1 or not all(getattr(n, "bias", None) is not None for n in norms
                               if family != "t5"):
        return "norms with different epsilons or without bias"
    return None


def hooked(model: torch.nn.Module) -> bool:
    """Hooks on the model, its decoder or its LM head (e.g. to capture hidden states): the HF
    path runs."""
    from torch.nn.modules import module as nn_module
    return (_overridden(model) or _overridden(model.get_decoder()) or _overridden(model.lm_head)
            or bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks))
