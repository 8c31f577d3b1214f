"""Backend functions over the C++ ops ``torch.ops.fastdecode.*`` (shared by ``cpu`` and ``cuda``:
the dispatcher picks the kernel from the tensors' device)."""

from __future__ import annotations

import torch

from fastdecode.ops._params import SamplingTensors

_ops = torch.ops.fastdecode


def append_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    _ops.append_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, *,
                    scale, causal, softcap, sliding_window, alibi_slopes, relative_bias=None,
                    workspace=None) -> None:
    _ops.paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                         scale, causal, softcap, sliding_window, alibi_slopes, relative_bias)


def apply_repetition_penalty(logits, seen_tokens, penalty) -> torch.Tensor:
    return _ops.apply_repetition_penalty(logits, seen_tokens, penalty)


def _args(p: SamplingTensors):
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.seen_tokens)


def process_logits(logits, params: SamplingTensors) -> torch.Tensor:
    return _ops.process_logits(logits, *_args(params))


def sample(logits, params: SamplingTensors, seeds, offsets) -> torch.Tensor:
    return _ops.sample(logits, *_args(params), seeds, offsets)


def contrastive_logits(expert, amateur, alpha, plausibility) -> torch.Tensor:
    return _ops.contrastive_logits(expert, amateur, alpha, plausibility)
