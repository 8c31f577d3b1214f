"""fastdecode.ops: paged-KV attention and fused sampling ops with selectable backends.

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"`` (see
:func:`fastdecode.ops._backends.resolve` for the ``auto`` rule).
"""

from fastdecode.ops._backends import BackendUnavailableError, available_backends, is_available
from fastdecode.ops.attention import append_kv, paged_attention
from fastdecode.ops.memory import allocate_kv_cache
from fastdecode.ops.sampling import apply_repetition_penalty, process_logits, sample

__all__ = [
    "append_kv",
    "paged_attention",
    "sample",
    "process_logits",
    "apply_repetition_penalty",
    "allocate_kv_cache",
    "available_backends",
    "is_available",
    "BackendUnavailableError",
]
