"""fastdecode.ops: paged-KV attention and fused sampling ops with selectable backends.

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "torch"`` (see
:func:`fastdecode.ops._backends.resolve` for the ``auto`` rule). Every op checks its inputs before
dispatch (:mod:`fastdecode.ops.attention` says what, and what the ``*_unchecked`` entry points
and the debug mode, :func:`set_debug_checks` / ``FASTDECODE_DEBUG_CHECKS=1``, change).
"""

from fastdecode.ops._backends import BackendUnavailableError, available_backends, is_available
from fastdecode.ops._checks import debug_checks, set_debug_checks
from fastdecode.ops.contrastive import contrastive_logits
from fastdecode.ops.attention import (
    append_kv,
    append_kv_unchecked,
    paged_attention,
    paged_attention_unchecked,
)
from fastdecode.ops.memory import allocate_kv_cache
from fastdecode.ops.sampling import apply_repetition_penalty, process_logits, sample

__all__ = [
    "append_kv",
    "append_kv_unchecked",
    "paged_attention",
    "paged_attention_unchecked",
    "sample",
    "process_logits",
    "apply_repetition_penalty",
    "contrastive_logits",
    "allocate_kv_cache",
    "set_debug_checks",
    "debug_checks",
    "available_backends",
    "is_available",
    "BackendUnavailableError",
]
