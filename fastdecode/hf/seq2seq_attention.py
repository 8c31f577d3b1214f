"""The ``"fastdecode_seq2seq"`` attention implementation: an encoder-decoder model's decoder
layers on paged caches (see :mod:`fastdecode.hf.seq2seq`).

It tells self-attention from cross-attention by the module's ``is_causal`` (True for decoder
self-attention in T5, BART and Marian, False for their cross-attention). Like ``"fastdecode"``,
the name is not registered in ``AttentionMaskInterface``, so that the models build no masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AttentionInterface

from fastdecode.plan import PagedKVCache, StepPlan

ATTN_NAME = "fastdecode_seq2seq"


@dataclass
class Seq2SeqPlan:
    """One decoder step: ``decoder`` plans the self-attention (the step's tokens), ``encoder``
    the cross-attention of the same tokens over the encoder's blocks; relative_bias: [Hq, 2R + 1]
    float32 (T5) or None."""

    decoder: StepPlan
    encoder: StepPlan
    relative_bias: Optional[torch.Tensor]


def seq2seq_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask, *, scaling=None, dropout=0.0,
                              position_bias=None, fastdecode_plan: Seq2SeqPlan | None = None,
                              fastdecode_kv: tuple[PagedKVCache, PagedKVCache] | None = None,
                              **kwargs):
    """query: [1, Hq, T, D]; key, value: [1, Hkv, T or S or 1, D] -> ([1, T, Hq, D], None).

    Self-attention appends the step's keys / values to the decoder cache; cross-attention
    appends the encoder's (first step only: later ``key`` is a placeholder row, ignored as the
    plan writes nothing) and reads the encoder blocks. ``position_bias`` (T5's dense bias) is replaced by the plan's relative_bias table.
    """
    if fastdecode_plan is None or fastdecode_kv is None:
        raise RuntimeError("the 'fastdecode_seq2seq' attention needs the forward keywords "
                           "fastdecode_plan and fastdecode_kv (run the model through "
                           "fastdecode.hf.seq2seq.Seq2SeqRunner)")
    if attention_mask is not None:
        raise NotImplementedError("the 'fastdecode_seq2seq' attention takes sequence boundaries "
                                  "from its plan; an explicit attention mask cannot be honoured")
    cross = not module.is_causal
    plan = fastdecode_plan.encoder if cross else fastdecode_plan.decoder
    out = fastdecode_kv[1 if cross else 0].attend(
        plan, module.layer_idx, query[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1),
        value[0].transpose(0, 1), scale=scaling, softcap=None, sliding_window=None,
        relative_bias=None if cross else fastdecode_plan.relative_bias)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_NAME, seq2seq_attention_forward)
