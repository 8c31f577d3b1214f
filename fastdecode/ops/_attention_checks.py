"""Argument checks of ``append_kv`` and ``paged_attention``, shared by every backend.

:func:`append_kv_args` and :func:`paged_attention_args` check shapes, dtypes and devices and
normalise the arguments into what every backend takes (int32 tables, int64 slots, float32
slopes, plain Python scalars). :func:`append_kv_values` and :func:`paged_attention_values` check
tensor contents on the host (see :mod:`fastdecode.ops._checks` for when that happens). Index
tensors given as int64 are narrowed with saturation, never truncated: a block id or length of
2**32 + 1 stays out of range for the kernels' guards instead of turning into a valid 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fastdecode.ops import _checks as c
from fastdecode.ops._checks import INT32_MAX

MAX_HEAD_DIM = 256


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """k_cache, v_cache: [N, P, Hkv, D], one float dtype, contiguous, every size >= 1.
    Returns (N, P, Hkv, D)."""
    if k_cache.dim() != 4:
        raise ValueError("k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {list(v_cache.shape)} != k_cache shape "
                         f"{list(k_cache.shape)}")
    c.check_float("k_cache", k_cache)
    c.check_float("v_cache", v_cache, k_cache.dtype)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    n, p, hkv, d = k_cache.shape
    for name, size, high in (("num_blocks", n, INT32_MAX), ("block_size", p, INT32_MAX),
                             ("num_kv_heads", hkv, INT32_MAX), ("head_dim", d, MAX_HEAD_DIM)):
        if not 1 <= size <= high:
            raise ValueError(f"k_cache: {name} must be in [1, {high}], got {size}")
    return n, p, hkv, d


def append_kv_args(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Checks append_kv's arguments; returns slot_mapping as contiguous int64."""
    n, p, hkv, d = check_cache(k_cache, v_cache)
    c.check_device(k_cache.device, key=key, value=value, v_cache=v_cache,
                   slot_mapping=slot_mapping)
    if key.dim() != 3 or key.shape[1:] != (hkv, d) or value.shape != key.shape:
        raise ValueError(f"key / value must be [num_tokens, {hkv}, {d}], got "
                         f"{list(key.shape)} / {list(value.shape)}")
    c.check_float("key", key, k_cache.dtype)
    c.check_float("value", value, k_cache.dtype)
    c.check_index("slot_mapping", slot_mapping, (key.shape[0],), "one slot per token")
    return slot_mapping.to(torch.int64).contiguous()


def append_kv_values(slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Every slot < N * P (negative slots skip their token)."""
    n, p = k_cache.shape[:2]
    slots = c.host(slot_mapping)
    if slots.size and slots.max() >= n * p:
        t = c.first(slots >= n * p)[0]
        raise ValueError(f"slot_mapping[{t}] = {slots[t]} is outside the cache: slots are in "
                         f"[0, {n * p}) (num_blocks {n} x block_size {p}), or < 0 to skip the "
                         "token")


@dataclass
class PagedArgs:
    """paged_attention's arguments as every backend takes them (see the op's docstring)."""

    query: torch.Tensor                    # [B or T, Hq, D], last dim contiguous
    block_tables: torch.Tensor             # [B, M] int32, contiguous
    seq_lens: torch.Tensor                 # [B] int32
    cu_seqlens_q: Optional[torch.Tensor]   # [B + 1] int32, or None (decode form)
    alibi_slopes: Optional[torch.Tensor]   # [Hq] float32, or None
    relative_bias: Optional[torch.Tensor]  # [Hq, 2R + 1] float32, contiguous, or None
    out: torch.Tensor                      # [B or T, Hq, D], query dtype, contiguous
    scale: float
    causal: bool
    softcap: float                         # 0 = off
    sliding_window: int                    # 0 = off
    workspace: Optional[torch.Tensor]      # float32, contiguous, or None


def paged_attention_args(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, *,
                         scale, causal, softcap, sliding_window, alibi_slopes, out,
                         workspace, relative_bias=None) -> PagedArgs:
    """Checks paged_attention's arguments (not their values); returns them normalised."""
    n, p, hkv, d = check_cache(k_cache, v_cache)
    dev = query.device
    c.check_device(dev, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                   seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q, alibi_slopes=alibi_slopes,
                   relative_bias=relative_bias, out=out, workspace=workspace)
    if query.dim() != 3 or query.shape[-1] != d:
        raise ValueError(f"query must be [tokens, num_qo_heads, {d}], got {list(query.shape)}")
    c.check_float("query", query, k_cache.dtype)
    tokens, hq = query.shape[0], query.shape[1]
    if hq < 1 or hq % hkv:
        raise ValueError(f"num_qo_heads {hq} must be a positive multiple of num_kv_heads {hkv}")
    c.check_index("seq_lens", seq_lens, (None,), "[num_seqs]")
    num_seqs = seq_lens.shape[0]
    c.check_index("block_tables", block_tables, (num_seqs, None),
                  "[num_seqs, max_blocks_per_seq]: one row per sequence")
    max_blocks = block_tables.shape[1]
    max_len = max_blocks * p  # positions are int32 in every kernel
    if max_len >= INT32_MAX:
        raise ValueError(f"max_blocks_per_seq {max_blocks} x block_size {p} must be < 2**31 - 1")
    if cu_seqlens_q is None:
        if tokens != num_seqs:
            raise ValueError(f"decode form: query has {tokens} tokens for {num_seqs} sequences "
                             "(pass cu_seqlens_q for the packed form)")
    else:
        c.check_index("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,), "[num_seqs + 1]")
        if tokens >= INT32_MAX:
            raise ValueError(f"packed form: {tokens} query tokens exceed int32 offsets")
    if alibi_slopes is not None:
        if not alibi_slopes.is_floating_point() or alibi_slopes.shape != (hq,):
            raise ValueError(f"alibi_slopes must be a [{hq}] float tensor, got "
                             f"{alibi_slopes.dtype} {list(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.to(torch.float32).contiguous()
    if relative_bias is not None:
        relative_bias = _relative_bias(relative_bias, hq)
    query = query if query.stride(-1) == 1 else query.contiguous()
    out = _check_out(out, query, k_cache, v_cache)
    if workspace is not None and (workspace.dtype != torch.float32
                                  or not workspace.is_contiguous()):
        raise ValueError(f"workspace must be a contiguous float32 tensor, got {workspace.dtype}")
    if cu_seqlens_q is not None:
        cu_seqlens_q = c.to_index(cu_seqlens_q, torch.int32, -1, tokens + 1)
    return PagedArgs(
        query=query,
        block_tables=c.to_index(block_tables, torch.int32, -1, n),
        seq_lens=c.to_index(seq_lens, torch.int32, -1, max_len + 1),
        cu_seqlens_q=cu_seqlens_q,
        alibi_slopes=alibi_slopes,
        relative_bias=relative_bias,
        out=out,
        scale=d ** -0.5 if scale is None else c.real("scale", scale),
        causal=_flag("causal", causal),
        softcap=0.0 if softcap is None else c.real(
            "softcap", softcap, low=c.FLOAT32_TINY, what="a finite number > 0 (or None)"),
        sliding_window=_window(sliding_window, max_len),
        workspace=workspace,
    )


def _relative_bias(table: torch.Tensor, hq: int) -> torch.Tensor:
    """relative_bias: [Hq, 2R + 1] float (an odd width: distances -R .. R) -> float32,
    contiguous."""
    if (not table.is_floating_point() or table.dim() != 2 or table.shape[0] != hq
            or table.shape[1] % 2 == 0 or table.shape[1] >= INT32_MAX):
        raise ValueError(f"relative_bias must be a [{hq}, 2 * R + 1] float tensor (the bias of "
                         "distances -R .. R), got "
                         f"{table.dtype} {list(table.shape)}")
    return table.to(torch.float32).contiguous()


def _check_out(out, query, k_cache, v_cache) -> torch.Tensor:
    if out is None:
        return torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if out.shape != query.shape or out.dtype != query.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {list(query.shape)} {query.dtype}, got "
                         f"{list(out.shape)} {out.dtype}")
    for name, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if c.overlaps(out, t):
            raise ValueError(f"out overlaps {name}: the output must not share memory with "
                             "the inputs")
    return out


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _window(sliding_window, max_len: int) -> int:
    """HF's meaning, 0 = off: None or <= 0 is no window, and so is one that covers every
    position a table can hold (which also keeps huge values out of the kernels' int32)."""
    if sliding_window is None:
        return 0
    w = c.integer("sliding_window", sliding_window)
    return 0 if w <= 0 or w >= max_len else w


def paged_attention_values(block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           cu_seqlens_q: Optional[torch.Tensor],
                           alibi_slopes: Optional[torch.Tensor], tokens: int,
                           k_cache: torch.Tensor, causal: bool = True,
                           relative_bias: Optional[torch.Tensor] = None) -> None:
    """Host checks of every id a kernel would follow (see the op's docstring for the rules), on
    the arguments as the caller gave them (before narrowing), ``tokens`` query tokens and the
    call's ``causal`` flag.
    Whole-tensor reductions first: the entry to blame is searched only when one is bad."""
    n, p = k_cache.shape[:2]
    max_blocks = block_tables.shape[1]
    lens = c.host(seq_lens)
    if lens.size and (lens.min() < 0 or lens.max() > max_blocks * p):
        b = c.first((lens < 0) | (lens > max_blocks * p))[0]
        raise ValueError(f"seq_lens[{b}] = {lens[b]} is outside [0, {max_blocks * p}] "
                         f"(max_blocks_per_seq {max_blocks} x block_size {p})")
    tables = c.host(block_tables)
    if tables.size and (tables.min() < 0 or tables.max() >= n):  # fine if never read
        read = np.arange(max_blocks)[None, :] < -(-lens // p)[:, None]
        bad = read & ((tables < 0) | (tables >= n))
        if bad.any():
            b, i = c.first(bad)
            raise ValueError(f"block_tables[{b}, {i}] = {tables[b, i]} is outside the cache: "
                             f"block ids are in [0, {n}) (seq_lens[{b}] = {lens[b]} reads "
                             f"{-(-lens[b] // p)} blocks)")
    if cu_seqlens_q is not None:
        _check_offsets(c.host(cu_seqlens_q), lens, tokens, causal)
    for name, table in (("alibi_slopes", alibi_slopes), ("relative_bias", relative_bias)):
        if table is not None:
            values = c.host(table)
            if not np.isfinite(values).all():
                at = c.first(~np.isfinite(values))
                raise ValueError(f"{name} must be finite float32 numbers, got {values[at]} at "
                                 f"{name}[{', '.join(map(str, at))}]")


def _check_offsets(cu: np.ndarray, lens: np.ndarray, tokens: int, causal: bool) -> None:
    """cu_seqlens_q [B + 1] from 0 to ``tokens``, non-decreasing, and in a causal call no
    sequence with more query tokens than a non-zero seq_lens [B] (a causal query needs its own
    KV position; a non-causal one, e.g. a decoder token over a shorter encoder sequence, does
    not)."""
    if cu[0] != 0 or cu[-1] != tokens:
        raise ValueError(f"cu_seqlens_q must run from 0 to the number of query tokens "
                         f"{tokens}, got {cu[0]} .. {cu[-1]}")
    q_lens = np.diff(cu)
    if q_lens.size and q_lens.min() < 0:
        b = c.first(q_lens < 0)[0]
        raise ValueError(f"cu_seqlens_q must be non-decreasing, got {cu[b]} then {cu[b + 1]} "
                         f"at seq {b}")
    bad = (q_lens > lens) & (lens > 0)
    if causal and bad.any():
        b = c.first(bad)[0]
        raise ValueError(f"cu_seqlens_q gives seq {b} {q_lens[b]} query tokens, more than its "
                         f"seq_lens[{b}] = {lens[b]} (allowed only with causal=False)")
