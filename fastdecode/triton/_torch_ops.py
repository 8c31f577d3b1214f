"""The Triton launchers as torch custom ops ``torch.ops.fastdecode.triton_*``, each with a fake
implementation, so that torch.compile treats them as opaque calls and CUDA graphs capture them.
(``triton_`` keeps them apart from the C++ ops of the same namespace.)"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdecode.ops._params import SamplingTensors
from fastdecode.triton import attention, contrastive, kv_cache, sampling


@torch.library.custom_op("fastdecode::triton_append_kv", mutates_args=("k_cache", "v_cache"))
def append_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
              slot_mapping: Tensor) -> None:
    kv_cache.append_kv(key, value, k_cache, v_cache, slot_mapping)


@append_kv.register_fake
def _(key, value, k_cache, v_cache, slot_mapping) -> None:
    return None


@torch.library.custom_op("fastdecode::triton_paged_attention", mutates_args=("out", "workspace"))
def paged_attention(out: Tensor, query: Tensor, k_cache: Tensor, v_cache: Tensor,
                    block_tables: Tensor, seq_lens: Tensor, cu_seqlens_q: Optional[Tensor],
                    alibi_slopes: Optional[Tensor], workspace: Optional[Tensor], scale: float,
                    causal: bool, softcap: float, sliding_window: int, partition_size: int,
                    relative_bias: Optional[Tensor] = None) -> None:
    attention.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out,
                              scale=scale, causal=causal, softcap=softcap,
                              sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                              workspace=workspace, partition_size=partition_size,
                              relative_bias=relative_bias)


@paged_attention.register_fake
def _(out, query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, alibi_slopes,
      workspace, scale, causal, softcap, sliding_window, partition_size,
      relative_bias=None) -> None:
    return None


@torch.library.custom_op("fastdecode::triton_apply_repetition_penalty", mutates_args=())
def apply_repetition_penalty(logits: Tensor, seen_tokens: Optional[Tensor],
                             penalty: Tensor) -> Tensor:
    return sampling.apply_repetition_penalty(logits, seen_tokens, penalty)


@apply_repetition_penalty.register_fake
def _(logits, seen_tokens, penalty) -> Tensor:
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("fastdecode::triton_contrastive_logits", mutates_args=())
def contrastive_logits(expert: Tensor, amateur: Tensor, alpha: Tensor,
                       plausibility: Tensor) -> Tensor:
    return contrastive.contrastive_logits(expert, amateur, alpha, plausibility)


@contrastive_logits.register_fake
def _(expert, amateur, alpha, plausibility) -> Tensor:
    return expert.new_empty(expert.shape, dtype=torch.float32)


def _params(temperature, top_k, top_p, min_p, penalty, seen_tokens) -> SamplingTensors:
    return SamplingTensors(temperature, top_k, top_p, min_p, penalty, seen_tokens,
                           has_penalty=seen_tokens is not None)


@torch.library.custom_op("fastdecode::triton_process_logits", mutates_args=())
def process_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                   min_p: Tensor, repetition_penalty: Tensor,
                   seen_tokens: Optional[Tensor]) -> Tensor:
    """seen_tokens None = no penalty stage."""
    return sampling.process_logits(
        logits, _params(temperature, top_k, top_p, min_p, repetition_penalty, seen_tokens))


@process_logits.register_fake
def _(logits, temperature, top_k, top_p, min_p, repetition_penalty, seen_tokens) -> Tensor:
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("fastdecode::triton_sample", mutates_args=())
def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
           repetition_penalty: Tensor, seen_tokens: Optional[Tensor], seeds: Tensor,
           offsets: Tensor) -> Tensor:
    """seen_tokens None = no penalty stage."""
    return sampling.sample(
        logits, _params(temperature, top_k, top_p, min_p, repetition_penalty, seen_tokens),
        seeds, offsets)


@sample.register_fake
def _(logits, temperature, top_k, top_p, min_p, repetition_penalty, seen_tokens, seeds,
      offsets) -> Tensor:
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)
