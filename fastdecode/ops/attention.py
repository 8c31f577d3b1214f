"""Public attention ops: ``append_kv`` and ``paged_attention`` (checks + backend dispatch), and
their unchecked twins for callers that built the inputs themselves.

What is checked: see :mod:`fastdecode.ops._attention_checks` (the rules) and
:mod:`fastdecode.ops._checks` (when value checks run on the host: always for CPU tensors; for
CUDA tensors only in the debug mode, ``FASTDECODE_DEBUG_CHECKS=1`` or
``fastdecode.ops.set_debug_checks(True)``, the kernels' device-side guards standing in
otherwise).

What an *unchecked* call (or a CUDA call outside the debug mode) guarantees for values the checks
would have refused: no access outside any tensor, ever. Beyond that, per backend: ``cpu``
raises ValueError (its C++ adapter checks values at no cost); ``torch``, ``triton`` and ``cuda``
skip a slot outside [0, N * P) as if it were negative, and write NaN to every output row of a
sequence whose ``seq_lens`` is outside [0, M * P], whose table holds a block id outside [0, N)
among the blocks it reads, or whose ``cu_seqlens_q`` span is inconsistent (negative, decreasing,
past the query tokens, or, in a causal call, longer than a non-zero ``seq_lens``), and to every
row no sequence owns (``cu_seqlens_q`` not starting at 0 or ending before the last token). The
other sequences' rows are exact. Ids given as int64 reach the backends saturated to int32 (a value
beyond int32 stays out of range), never truncated.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.ops import _backends, _checks
from fastdecode.ops._attention_checks import (
    append_kv_args,
    append_kv_values,
    paged_attention_args,
    paged_attention_values,
)


def append_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
              backend: str = "auto") -> None:
    """Write new keys/values into the paged cache, in place.

    key, value: [num_tokens, num_kv_heads, head_dim], the cache dtype (any strides).
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous, float32 /
        float16 / bfloat16, every size >= 1, head_dim <= 256.
    slot_mapping: [num_tokens] integer (int64; int32 / int16 / int8 / uint8 accepted); token t
        goes to slot ``slot_mapping[t]`` = block * P + offset; a negative slot skips the token
        (padding). A slot >= N * P raises ValueError naming the token.
    Every tensor on one device, else ValueError. Slots are checked on the host for CPU tensors;
    for CUDA tensors only in the debug mode (``FASTDECODE_DEBUG_CHECKS=1`` or
    ``set_debug_checks(True)``), the kernel skipping a slot outside the cache otherwise.
    """
    _append(key, value, k_cache, v_cache, slot_mapping, backend, True)


def append_kv_unchecked(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                        backend: str = "auto") -> None:
    """:func:`append_kv` without the value checks (shapes, dtypes and devices are still
    checked): for callers that computed ``slot_mapping`` themselves. See the module docstring
    for what a bad slot does then."""
    _append(key, value, k_cache, v_cache, slot_mapping, backend, False)


def _append(key, value, k_cache, v_cache, slot_mapping, backend: str, checked: bool) -> None:
    slots = append_kv_args(key, value, k_cache, v_cache, slot_mapping)
    impl = _backends.resolve(backend, "append_kv", k_cache.device)
    if checked and _values_here(impl, k_cache.device):
        append_kv_values(slot_mapping, k_cache)
    if key.shape[0]:
        impl.append_kv(key, value, k_cache, v_cache, slots)


def _values_here(impl, device: torch.device, *index: Optional[torch.Tensor]) -> bool:
    """Whether a checked call reads its values here: they are checked on the host for
    ``device``, and the backend does not run the same checks itself (the C++ CPU adapter does,
    at no cost, on the ids it receives unchanged: ``index`` tensors narrowed from int64 are
    checked here, where the error can name the value the caller gave)."""
    if not _checks.host_checks(device):
        return False
    delegated = getattr(impl, "CHECKS_VALUES", False)
    return not delegated or any(t is not None and t.dtype == torch.int64 for t in index)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                    cu_seqlens_q: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    causal: bool = True, softcap: Optional[float] = None,
                    sliding_window: Optional[int] = None,
                    alibi_slopes: Optional[torch.Tensor] = None,
                    relative_bias: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, workspace: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention of queries over a paged KV cache.

    Decode form (``cu_seqlens_q`` None): query [num_seqs, num_qo_heads, head_dim], one token per
    sequence, the sequence's last KV position. Packed form: query [num_tokens, num_qo_heads,
    head_dim] with cu_seqlens_q [num_seqs + 1] integer (int32); the query tokens of sequence b
    are its last ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` KV positions (bottom-right causal
    alignment). With ``causal=False`` a sequence may have more query tokens than KV tokens
    (cross-attention: decoder tokens over a shorter encoder sequence); the positions keep the
    same rule (query t of q_len at seq_lens[b] - q_len + t, negative ones included), which only
    the sliding window and ALiBi read: without them every query sees the whole sequence, whatever
    the alignment.

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], keys already appended.
    block_tables: [num_seqs, max_blocks_per_seq] integer (int32). seq_lens: [num_seqs] integer
    (int32), KV lengths including the query tokens. scale: default head_dim ** -0.5.
    softcap: logits = softcap * tanh(logits / softcap), before masking. sliding_window w: a query
    at position i sees keys i - w < j <= i (None or <= 0: no window). alibi_slopes:
    [num_qo_heads] float (used as float32), bias slope * (j - i). relative_bias: [num_qo_heads,
    2 * R + 1] float (used as float32), bias ``relative_bias[h, R + clamp(j - i, -R, R)]``: a
    learned bias per head and relative distance, saturating beyond R (T5's bucketed relative
    position bias expanded per distance, see the README). Both biases are added after the
    softcap, before masking. causal: a bool.
    Query head h reads kv head h // (num_qo_heads // num_kv_heads). Rows with seq_lens 0 give
    zeros. out: optional preallocated output, same shape / dtype as the result, contiguous, not
    overlapping query or the caches. workspace: optional float32 scratch for split-KV backends
    (``workspace_size`` of the backend gives its size); the call then allocates nothing.

    Value rules (ValueError naming the argument and the offending entry): 0 <= seq_lens[b] <=
    M * P; every block id a sequence reads (its first ceil(seq_lens[b] / P) table entries) in
    [0, N); cu_seqlens_q runs from 0 to num_tokens, non-decreasing, and when causal no sequence
    with more query tokens than a non-zero seq_lens; alibi slopes and relative_bias finite;
    scale finite; softcap None or a finite number > 0. Ids given as int64 are never truncated to int32. Values are checked on the host
    for CPU tensors; for CUDA tensors only in the debug mode (``FASTDECODE_DEBUG_CHECKS=1`` or
    ``set_debug_checks(True)``), the kernels' guards standing in otherwise (module docstring).

    Returns out: [num_seqs or num_tokens, num_qo_heads, head_dim], the query dtype.
    """
    return _attend(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                   causal, softcap, sliding_window, alibi_slopes, relative_bias, out, workspace,
                   backend, True)


def paged_attention_unchecked(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                              cu_seqlens_q: Optional[torch.Tensor] = None,
                              scale: Optional[float] = None, causal: bool = True,
                              softcap: Optional[float] = None,
                              sliding_window: Optional[int] = None,
                              alibi_slopes: Optional[torch.Tensor] = None,
                              relative_bias: Optional[torch.Tensor] = None,
                              out: Optional[torch.Tensor] = None,
                              workspace: Optional[torch.Tensor] = None,
                              backend: str = "auto") -> torch.Tensor:
    """:func:`paged_attention` without the value checks (shapes, dtypes, devices and scalars are
    still checked): for callers that built the block tables, lengths and offsets themselves,
    e.g. once per step for every layer. See the module docstring for what bad values do then."""
    return _attend(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                   causal, softcap, sliding_window, alibi_slopes, relative_bias, out, workspace,
                   backend, False)



def _attend(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, causal,
            softcap, sliding_window, alibi_slopes, relative_bias, out, workspace, backend: str,
            checked: bool) -> torch.Tensor:
    a = paged_attention_args(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                             scale=scale, causal=causal, softcap=softcap,
                             sliding_window=sliding_window, alibi_slopes=alibi_slopes, out=out,
                             workspace=workspace, relative_bias=relative_bias)
    op = ("paged_prefill" if a.cu_seqlens_q is not None
          else "paged_attention" if a.relative_bias is None else "paged_relative_bias")
    impl = _backends.resolve(backend, op, a.query.device, head_dim=a.query.shape[-1])
    if checked and _values_here(impl, a.query.device, block_tables, seq_lens, cu_seqlens_q):
        paged_attention_values(block_tables, seq_lens, cu_seqlens_q, a.alibi_slopes,
                               a.query.shape[0], k_cache, a.causal, a.relative_bias)
    if a.query.shape[0] and a.seq_lens.shape[0]:
        impl.paged_attention(a.query, k_cache, v_cache, a.block_tables, a.seq_lens,
                             a.cu_seqlens_q, a.out, scale=a.scale, causal=a.causal,
                             softcap=a.softcap, sliding_window=a.sliding_window,
                             alibi_slopes=a.alibi_slopes, relative_bias=a.relative_bias,
                             workspace=a.workspace)
    elif a.query.shape[0]:  # query tokens but no sequence (unchecked cu_seqlens_q): no owner
        a.out.fill_(float("nan"))
    return a.out
