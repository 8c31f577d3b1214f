"""The ``"fastdecode"`` attention implementation for transformers' ``AttentionInterface``.

A model whose ``config._attn_implementation`` is ``"fastdecode"`` calls :func:`paged_attention_forward`
in every attention layer. The step is one packed batch (``input_ids [1, T]``); sequence boundaries
come from the :class:`~fastdecode.plan.StepPlan` passed as the forward keyword
``fastdecode_plan``, never from a mask, and every layer's call goes to the
:class:`~fastdecode.plan.PagedKVCache` passed as ``fastdecode_kv`` (backends resolved once,
checks once per layer signature). The name is deliberately *not* registered in
``AttentionMaskInterface``: for unknown names ``create_causal_mask`` and its sliding-window twin
return ``None`` without building anything.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from fastdecode.plan import PagedKVCache, StepPlan

ATTN_NAME = "fastdecode"


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask, *, scaling=None, dropout=0.0,
                            fastdecode_plan: StepPlan | None = None,
                            fastdecode_kv: PagedKVCache | None = None, **kwargs):
    """query: [1, Hq, T, D] (RoPE applied); key, value: [1, Hkv, T, D] -> ([1, T, Hq, D], None).

    Appends this layer's keys/values at the plan's slots and attends over the paged cache.
    """
    if fastdecode_plan is None or fastdecode_kv is None:
        raise RuntimeError("the 'fastdecode' attention needs the forward keywords fastdecode_plan "
                           "and fastdecode_kv (run the model through fastdecode.hf.PagedRunner)")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not implemented by the paged "
                                  "kernels; this model must run on the generic path")
    if attention_mask is not None:
        raise NotImplementedError("the 'fastdecode' attention takes sequence boundaries from its "
                                  "plan; an explicit attention mask cannot be honoured")
    if query.shape[0] != 1:
        raise ValueError(f"expected one packed batch [1, H, T, D], got {tuple(query.shape)}")
    # [1, H, T, D] -> [T, H, D]: views, no copy for the keys/values (append_kv takes strides).
    out = fastdecode_kv.attend(
        fastdecode_plan, module.layer_idx, query[0].transpose(0, 1).contiguous(),
        key[0].transpose(0, 1), value[0].transpose(0, 1),
        scale=scaling if scaling is not None else getattr(module, "scaling", None),
        softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"))
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, paged_attention_forward)
