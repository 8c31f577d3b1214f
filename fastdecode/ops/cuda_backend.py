"""``backend="cuda"``: the hand-written CUDA kernels of ``fastdecode._C`` (decode attention,
append_kv, sample, contrastive_logits). Packed-prefill attention is served by Triton, as the
contract says."""

from __future__ import annotations

import torch

from fastdecode.ops import _cxx_ops, _extension
from fastdecode.ops._backends import BackendUnavailableError

append_kv = _cxx_ops.append_kv
sample = _cxx_ops.sample
contrastive_logits = _cxx_ops.contrastive_logits

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)


def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _extension.has_cuda_kernels():
        return "fastdecode._C was built without CUDA kernels (rebuild with a CUDA torch)"
    return None


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out,
                    **kwargs) -> None:
    head_dim = query.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise BackendUnavailableError(
            f"unsupported head_dim {head_dim} (supported: {SUPPORTED_HEAD_DIMS})")
    _cxx_ops.paged_attention(query, k_cache, v_cache, block_tables, seq_lens, None, out,
                             **kwargs)
