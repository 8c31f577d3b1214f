"""Loads the C++ extension ``fastdecode._C`` and registers the fake (meta) implementations of its
ops, so they trace under ``torch.compile`` and pass ``torch.library.opcheck``.

The fakes also refuse tensors on different devices: a call mixing a meta tensor into CPU
tensors dispatches to the fake, which would otherwise return without writing anything.
"""

from __future__ import annotations

import torch

import fastdecode._C  # noqa: F401  (registers torch.ops.fastdecode.*)
from fastdecode.ops._checks import same_device

_LIB = "fastdecode::"


@torch.library.register_fake(_LIB + "append_kv")
def _append_kv_fake(key, value, k_cache, v_cache, slot_mapping) -> None:
    same_device(k_cache.device, key=key, value=value, v_cache=v_cache, slot_mapping=slot_mapping)


@torch.library.register_fake(_LIB + "paged_attention")
def _paged_attention_fake(out, query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                          scale, causal, softcap, sliding_window, alibi_slopes,
                          relative_bias=None) -> None:
    same_device(query.device, out=out, k_cache=k_cache, v_cache=v_cache,
                block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q,
                alibi_slopes=alibi_slopes, relative_bias=relative_bias)


@torch.library.register_fake(_LIB + "paged_attention_lse")
def _paged_attention_lse_fake(out, lse, query, k_cache, v_cache, block_tables, seq_lens,
                              cu_seqlens_q, scale, causal, softcap) -> None:
    same_device(query.device, out=out, lse=lse, k_cache=k_cache, v_cache=v_cache,
                block_tables=block_tables, seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)


@torch.library.register_fake(_LIB + "apply_repetition_penalty")
def _penalty_fake(logits, seen_tokens, penalty):
    same_device(logits.device, seen_tokens=seen_tokens, penalty=penalty)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake(_LIB + "process_logits")
def _process_fake(logits, temperature, top_k, top_p, min_p, repetition_penalty, seen_tokens):
    same_device(logits.device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seen_tokens=seen_tokens)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake(_LIB + "sample")
def _sample_fake(logits, temperature, top_k, top_p, min_p, repetition_penalty, seen_tokens,
                 seeds, offsets):
    same_device(logits.device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seen_tokens=seen_tokens, seeds=seeds,
                offsets=offsets)
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)


@torch.library.register_fake(_LIB + "pack_linear_weight")
def _pack_linear_weight_fake(packed, weight) -> None:
    same_device(weight.device, packed=packed)


@torch.library.register_fake(_LIB + "packed_linear")
def _packed_linear_fake(x, packed, bias, out_features):
    same_device(x.device, packed=packed, bias=bias)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake(_LIB + "rms_norm")
def _rms_norm_fake(x, weight, eps):
    same_device(x.device, weight=weight)
    return torch.empty_like(x)


@torch.library.register_fake(_LIB + "rotary_embedding")
def _rotary_fake(x, positions, inv_freq, scaling) -> None:
    same_device(x.device, positions=positions, inv_freq=inv_freq)


@torch.library.register_fake(_LIB + "silu_and_mul")
def _silu_and_mul_fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake(_LIB + "decoder_layers")
def _decoder_layers_fake(hidden, positions, layers, k_caches, v_caches, sliding_windows,
                         block_tables, seq_lens, cu_seqlens_q, slot_mapping, inv_freq,
                         rotary_scaling, num_heads, eps, scale, shared_prefix) -> None:
    same_device(hidden.device, positions=positions, block_tables=block_tables,
                seq_lens=seq_lens, slot_mapping=slot_mapping, inv_freq=inv_freq,
                **{f"shared_prefix[{i}]": t for i, t in enumerate(shared_prefix)})


@torch.library.register_fake(_LIB + "contrastive_logits")
def _contrastive_fake(expert_logits, amateur_logits, alpha, plausibility):
    same_device(expert_logits.device, amateur_logits=amateur_logits, alpha=alpha,
                plausibility=plausibility)
    return expert_logits.new_empty(expert_logits.shape, dtype=torch.float32)


def has_cuda_kernels() -> bool:
    """Whether this build of the extension carries the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(_LIB + "paged_attention", "CUDA")
