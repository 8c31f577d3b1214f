"""The ``"fastdecode"`` attention implementation for transformers' ``AttentionInterface``.

A model whose ``config._attn_implementation`` is ``"fastdecode"`` calls :func:`paged_attention_forward`
in every attention layer. The step is one packed batch (``input_ids [1, T]``); sequence boundaries
come from the :class:`PagedContext` passed as the forward keyword ``fastdecode_ctx``, never from a
mask. The name is deliberately *not* registered in ``AttentionMaskInterface``: for unknown names
``create_causal_mask`` and its sliding-window twin return ``None`` without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from fastdecode import ops
from fastdecode.hf.context import PagedContext

ATTN_NAME = "fastdecode"


@dataclass
class LayerCaches:
    """Per-layer paged caches, passed to the model as the forward keyword ``fastdecode_kv``.

    k_caches[i], v_caches[i]: [num_blocks, block_size, num_kv_heads, head_dim] of layer i.
    calls: attention calls seen since the runner last reset it (checks every layer ran here).
    """

    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    calls: int = field(default=0)


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask, *, scaling=None, dropout=0.0,
                            fastdecode_ctx: PagedContext | None = None,
                            fastdecode_kv: LayerCaches | None = None, **kwargs):
    """query: [1, Hq, T, D] (RoPE applied); key, value: [1, Hkv, T, D] -> ([1, T, Hq, D], None).

    Appends this layer's keys/values at ``ctx.slot_mapping`` and attends over the paged cache.
    """
    if fastdecode_ctx is None or fastdecode_kv is None:
        raise RuntimeError("the 'fastdecode' attention needs the forward keywords fastdecode_ctx "
                           "and fastdecode_kv (run the model through fastdecode.hf.PagedRunner)")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not implemented by the paged "
                                  "kernels; this model must run on the generic path")
    if attention_mask is not None:
        raise NotImplementedError("the 'fastdecode' attention takes sequence boundaries from its "
                                  "context; an explicit attention mask cannot be honoured")
    if query.shape[0] != 1:
        raise ValueError(f"expected one packed batch [1, H, T, D], got {tuple(query.shape)}")
    ctx, kv = fastdecode_ctx, fastdecode_kv
    layer = module.layer_idx
    k_cache, v_cache = kv.k_caches[layer], kv.v_caches[layer]
    kv.calls += 1
    dtype = query.dtype
    # [1, H, T, D] -> [T, H, D]: views, no copy for the keys/values (append_kv takes strides).
    key, value, query = key[0].transpose(0, 1), value[0].transpose(0, 1), query[0].transpose(0, 1)
    if dtype != k_cache.dtype:  # a cache in another dtype than the model (kv_dtype)
        key, value, query = (t.to(k_cache.dtype) for t in (key, value, query))
    ops.append_kv(key, value, k_cache, v_cache, ctx.slot_mapping, backend=ctx.backend)
    softcap = kwargs.get("softcap")
    out = ops.paged_attention(
        query.contiguous(), k_cache, v_cache, ctx.block_tables, ctx.seq_lens,
        cu_seqlens_q=None if ctx.decode_only else ctx.cu_seqlens_q,
        scale=scaling if scaling is not None else getattr(module, "scaling", None),
        softcap=softcap if softcap else None, sliding_window=kwargs.get("sliding_window") or None,
        workspace=ctx.workspace, backend=ctx.backend)
    return (out if out.dtype == dtype else out.to(dtype)).unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, paged_attention_forward)
