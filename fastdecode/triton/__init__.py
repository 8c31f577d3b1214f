"""``backend="triton"``: Triton kernels for every op (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1), implementing the backend interface of :mod:`fastdecode.ops.torch_backend`
through the custom ops ``torch.ops.fastdecode.triton_*``.

Kernels and launchers: :mod:`.attention` (paged attention, split-KV merge), :mod:`.kv_cache`
(append_kv), :mod:`.sampling`, :mod:`.contrastive` (contrastive-decoding scores). Decode
attention follows a plan / run split: ``plan_attention`` derives the launch from shapes alone
(once per step, cached), and a caller that preallocates ``workspace_size(num_seqs, num_qo_heads,
head_dim, max_blocks_per_seq, block_size)`` float32 elements and passes them as ``workspace=``
gets per-layer calls that neither allocate nor sync (CUDA-graph capturable).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
except ImportError:  # reported by unavailable_reason(); the ops layer then never calls us
    triton = None

if triton is not None:
    from fastdecode.triton import _torch_ops, attention
    from fastdecode.triton.attention import plan_attention, workspace_size

    __all__ = ["append_kv", "paged_attention", "process_logits", "sample",
               "apply_repetition_penalty", "contrastive_logits", "unavailable_reason",
               "plan_attention", "workspace_size"]


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


def append_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    _torch_ops.append_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, *,
                    scale, causal, softcap, sliding_window, alibi_slopes, relative_bias=None,
                    workspace=None, partition_size=None) -> None:
    """partition_size: KV tokens per split-KV partition (default ``attention.PARTITION_SIZE``,
    read at each call so tests can lower it)."""
    _torch_ops.paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens,
                               cu_seqlens_q, alibi_slopes, workspace, scale, causal, softcap,
                               sliding_window, partition_size or attention.PARTITION_SIZE,
                               relative_bias)


def _sampling_args(params):
    seen = params.seen_tokens if params.has_penalty else None
    return (params.temperature, params.top_k, params.top_p, params.min_p,
            params.repetition_penalty, seen)


def process_logits(logits, params) -> torch.Tensor:
    return _torch_ops.process_logits(logits, *_sampling_args(params))


def sample(logits, params, seeds, offsets) -> torch.Tensor:
    return _torch_ops.sample(logits, *_sampling_args(params), seeds, offsets)


def apply_repetition_penalty(logits, seen_tokens, penalty) -> torch.Tensor:
    return _torch_ops.apply_repetition_penalty(logits, seen_tokens, penalty)


def contrastive_logits(expert, amateur, alpha, plausibility) -> torch.Tensor:
    return _torch_ops.contrastive_logits(expert, amateur, alpha, plausibility)
