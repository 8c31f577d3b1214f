"""Paged attention: one kernel for the decode and the packed (prefill / mixed) forms, and the
log-sum-exp merge of split-KV partitions.

A program owns a tile of ``BLOCK_ROWS`` query rows that share one KV head: the rows are the
(token, head-in-group) pairs of a sequence's queries, flattened token-major, so the Hq / Hkv
query heads of a GQA group sit in one ``tl.dot`` tile and every KV block is loaded once per group
(decode: one token x group heads, padded to >= 16 rows; packed: several tokens x group heads).

Decode form splits each sequence's KV into partitions of ``partition_size`` tokens (a constant,
never derived from the batch, so a sequence's result does not depend on its batchmates); each
partition writes (normalised partial output, log-sum-exp) to the workspace and
``_merge_partitions_kernel`` combines them. Sequences that fit in one partition are written
straight to ``out``; merging a single partition would give the same bits.

Device-side guards (on CUDA tensors the public op does not copy index tensors to the host to
check them): a sequence whose seq_len lies outside [0, max_blocks_per_seq * block_size], whose
``cu_seqlens_q`` range is inconsistent (negative start, decreasing, longer than a non-empty KV in
a causal call, ending past num_tokens) or whose block table holds an id outside [0, num_blocks) gets NaN in its output rows
(those inside [0, num_tokens)), and nothing outside the tensors is ever read or written. Decode
checks each block id as it loads it (the id is in a register already; the split-KV merge carries
the NaN); the packed form checks the sequence's whole table first, so every row of it is flagged.

Integer arguments that change with the batch (``num_seqs``, ``num_tokens``, the block table's row
stride and width, the partition count) are excluded from Triton's specialisation, so a new batch
size never triggers a compile.

Shapes: query [num_tokens, num_qo_heads, head_dim] (num_tokens = num_seqs in decode form);
k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block_tables
[num_seqs, max_blocks_per_seq] int32; seq_lens [num_seqs] int32; cu_seqlens_q [num_seqs + 1] int32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from fastdecode.triton._common import next_pow2, upcast_loads

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E), exp2 is the fast path


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2|x| + 1) saturates to +-1 without libdevice, but cancels for small |x| (a large
    # softcap maps every logit there), so below 0.625 an odd minimax polynomial takes over: the
    # CUDA kernels' accurate_tanh. NaN stays NaN.
    a = tl.abs(x)
    z = x * x
    poly = -5.70498872745e-3 * z + 2.06390887954e-2
    poly = poly * z - 5.37397155531e-2
    poly = poly * z + 1.33314422036e-1
    poly = poly * z - 3.33332819422e-1
    small = poly * z * x + x
    big = 1.0 - 2.0 / (tl.exp2(a * 2.8853900817779268) + 1.0)
    return tl.where(a < 0.625, small, tl.where(x < 0, -big, big))


@triton.jit
def _first_tile(q_start, seq, group, BLOCK_ROWS: tl.constexpr):
    """First packed-grid tile of sequence ``seq``. A negative (guarded) start counts as 0, so
    its tiles still cover the rows in [0, end)."""
    return tl.maximum(q_start, 0) * group // BLOCK_ROWS + seq


@triton.jit
def _find_seq(cu_seqlens_q_ptr, num_seqs, tile, group, BLOCK_ROWS: tl.constexpr):
    """The sequence owning ``tile`` in the packed grid, where sequence b's tiles start at
    ``_first_tile(cu_seqlens_q[b], b)`` (a bound the host knows without reading cu_seqlens_q, so
    the grid needs no sync). Binary search for the last b starting <= tile; always in range,
    whatever cu_seqlens_q holds."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = _first_tile(tl.load(cu_seqlens_q_ptr + mid), mid, group, BLOCK_ROWS)
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    return lo


@triton.jit
def _table_in_range(table, num_table_blocks, num_blocks, CHUNK: tl.constexpr):
    """Whether the first ``num_table_blocks`` ids of a block-table row lie in [0, num_blocks)."""
    bad = tl.zeros([CHUNK], tl.int32)
    for b0 in range(0, num_table_blocks, CHUNK):
        offs = b0 + tl.arange(0, CHUNK)
        ids = tl.load(table + offs, mask=offs < num_table_blocks, other=0)
        bad = tl.maximum(bad, ((ids < 0) | (ids >= num_blocks)).to(tl.int32))
    return tl.max(bad, 0) == 0


# Batch-dependent integers: never specialised on (see the module docstring).
_BATCH_ARGS = ["num_seqs", "num_tokens", "stride_bt", "max_blocks_per_seq", "max_partitions"]


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _paged_attention_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr, alibi_slopes_ptr, relative_bias_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kp, stride_kh, stride_bt,
    num_seqs, num_tokens, num_qo_heads, group, head_dim, block_size, num_blocks,
    max_blocks_per_seq, partition_size, max_partitions,
    scale, softcap, sliding_window, causal, use_alibi, relative_radius,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PACKED: tl.constexpr, RELATIVE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (row tiles, num_kv_heads, partitions). Online softmax over the program's KV range
    in BLOCK_N-token steps, gathering each token's block through the block table. Writes
    ``out`` when the sequence has one partition, else (partial out, lse) to the workspace
    part_out [num_tokens, num_qo_heads, max_partitions, head_dim] float32 and part_lse
    [num_tokens, num_qo_heads, max_partitions] float32. RELATIVE: add relative_bias
    [num_qo_heads, 2R + 1] (R = relative_radius) at R + clamp(j - i, -R, R). UPCAST: interpreter
    only."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    if PACKED:
        seq = _find_seq(cu_seqlens_q_ptr, num_seqs, tile, group, BLOCK_ROWS)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
        q_len = q_end - q_start
        row0 = (tile - _first_tile(q_start, seq, group, BLOCK_ROWS)) * BLOCK_ROWS
    else:
        tiles_per_seq = tl.cdiv(group, BLOCK_ROWS)
        seq = tile // tiles_per_seq
        q_start = seq
        q_len = 1
        row0 = (tile % tiles_per_seq) * BLOCK_ROWS
    kv_len = tl.load(seq_lens_ptr + seq)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Guards: a bad sequence keeps kv_len 0 (nothing read, one partition) and NaN rows.
    valid = (kv_len >= 0) & (kv_len.to(tl.int64) <= max_blocks_per_seq.to(tl.int64) * block_size)
    if PACKED:
        # More query tokens than KV positions: fine without causality (cross-attention) and
        # for an empty sequence (zeros), a bad span otherwise.
        valid = (valid & (q_start >= 0) & (q_len >= 0) & (q_end <= num_tokens)
                 & ((q_len <= kv_len) | (kv_len == 0) | (causal == 0)))
        valid = valid & _table_in_range(table, tl.where(valid, tl.cdiv(kv_len, block_size), 0),
                                        num_blocks, 128)
        q_start = tl.maximum(q_start, 0)  # the guarded rows of a negative start: [0, q_end)
        q_len = q_end - q_start
    kv_len = tl.where(valid, kv_len, 0)
    num_rows = tl.maximum(q_len, 0) * group
    num_parts = tl.cdiv(kv_len, partition_size)
    # Partitions past the sequence's end have nothing to do (and nothing reads them).
    if (row0 < num_rows) & (part < tl.maximum(num_parts, 1)):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        q_tok = (q_start + rows // group).to(tl.int64)
        row_ok = (rows >= 0) & (rows < num_rows) & (q_tok >= 0) & (q_tok < num_tokens)
        head = kv_head * group + rows % group
        pos = kv_len - q_len + rows // group  # KV position of each row's query
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_ok = offs_d < head_dim
        q = tl.load(q_ptr + q_tok[:, None] * stride_qt + head[:, None] * stride_qh
                    + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        # use_alibi is 0 or 1; without ALiBi no slope is read and slope 0 adds an exact 0.
        slope = tl.load(alibi_slopes_ptr + head, mask=row_ok & (rows < num_rows * use_alibi),
                        other=0.0)

        # KV range of this program: causal limit of its last row, window of its first row,
        # intersected with its partition.
        last_row = tl.minimum(row0 + BLOCK_ROWS, num_rows) - 1
        first_pos = kv_len - q_len + row0 // group
        lo = part * partition_size
        hi = (part + 1) * partition_size
        if sliding_window > 0:
            lo = tl.maximum(lo, first_pos - sliding_window + 1)
        if causal != 0:
            hi = tl.minimum(hi, kv_len - q_len + last_row // group + 1)
        else:
            hi = tl.minimum(hi, kv_len)

        m_i = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_ROWS], tl.float32)
        acc = tl.zeros([BLOCK_ROWS, HEAD_DIM_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            # int64: block id x block stride overflows int32 in large caches.
            block = tl.load(table + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
            if not PACKED:  # guard: an id outside the pool is not read, its column turns NaN
                bad_col = n_ok & ((block < 0) | (block >= num_blocks))
                block = tl.where(bad_col, 0, block)
            kv_off = block * stride_kb + (offs_n % block_size) * stride_kp + kv_head * stride_kh
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            if softcap > 0:  # before masking and bias, as in Gemma 2
                s = softcap * _tanh(s / softcap)
            rel = offs_n[None, :] - pos[:, None]  # key position - query position
            s += slope[:, None] * rel.to(tl.float32)
            if RELATIVE:  # a gather from the [Hq, 2R + 1] table, cached on chip
                dist = tl.minimum(tl.maximum(rel, -relative_radius), relative_radius)
                bias_off = head.to(tl.int64)[:, None] * (2 * relative_radius + 1) + dist
                s += tl.load(relative_bias_ptr + relative_radius + bias_off,
                             mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            visible = (row_ok[:, None] & n_ok[None, :] & ((causal == 0) | (rel <= 0))
                       & ((sliding_window == 0) | (rel > -sliding_window)))
            s = tl.where(visible, s, float("-inf"))
            if not PACKED:
                s = tl.where(bad_col[None, :], float("nan"), s)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen nothing yet keeps m = -inf; shift by 0 to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2((s - m_safe[:, None]) * LOG2E)
            alpha = tl.exp2((m_i - m_safe) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # nothing visible -> zeros, not NaN
        out = tl.where(valid, out, float("nan"))
        mask = row_ok[:, None] & d_ok[None, :]
        o_ptrs = out_ptr + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        if num_parts <= 1:
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            ws = (q_tok * num_qo_heads + head) * max_partitions + part
            tl.store(part_out_ptr + ws[:, None] * head_dim + offs_d[None, :], out, mask=mask)
            # l_i == 0: nothing visible; a NaN l_i (guarded block) gives a NaN lse for the merge.
            lse = tl.where(l_i == 0, float("-inf"), m_i + tl.log(tl.where(l_i == 0, 1.0, l_i)))
            tl.store(part_lse_ptr + ws, lse, mask=row_ok)


@triton.jit(do_not_specialize=["max_kv_len", "max_partitions"])
def _merge_partitions_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr,
    stride_ot, stride_oh,
    num_qo_heads, head_dim, max_kv_len, partition_size, max_partitions,
    PARTS_BLOCK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    """out[seq, head] = sum_i w_i o_i / sum_i w_i, w_i = exp(lse_i - max lse), over the
    sequence's partitions in a fixed order (batch-invariant). A NaN lse (a partition that met an
    out-of-range block id) makes the row NaN; a guarded seq_len (outside [0, max_kv_len]) was
    written by the attention kernel."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_len = tl.load(seq_lens_ptr + seq)
    kv_len = tl.where((kv_len >= 0) & (kv_len <= max_kv_len), kv_len, 0)
    num_parts = tl.cdiv(kv_len, partition_size)
    if num_parts > 1:  # else the attention kernel wrote out directly
        base = (seq.to(tl.int64) * num_qo_heads + head) * max_partitions
        offs_p = tl.arange(0, PARTS_BLOCK)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        m = tl.full([PARTS_BLOCK], float("-inf"), tl.float32)
        for p0 in range(0, num_parts, PARTS_BLOCK):
            lse = tl.load(part_lse_ptr + base + p0 + offs_p, mask=p0 + offs_p < num_parts,
                          other=float("-inf"))
            m = tl.maximum(m, lse)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        l_acc = tl.zeros([PARTS_BLOCK], tl.float32)
        acc = tl.zeros([PARTS_BLOCK, HEAD_DIM_PAD], tl.float32)
        for p0 in range(0, num_parts, PARTS_BLOCK):
            p_ok = p0 + offs_p < num_parts
            lse = tl.load(part_lse_ptr + base + p0 + offs_p, mask=p_ok, other=float("-inf"))
            w = tl.exp(lse - m_safe)  # 0 for partitions the window hid entirely
            o = tl.load(part_out_ptr + (base + p0 + offs_p)[:, None] * head_dim + offs_d[None, :],
                        mask=p_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
            l_acc += w
            acc += w[:, None] * o
        l_sum = tl.sum(l_acc, 0)
        out = tl.sum(acc, 0) / tl.where(l_sum > 0, l_sum, 1.0)
        o_ptr = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


# ------------------------------------------------------------------------------------ launchers
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims are padded (and masked) to one of these. 64 is the floor: tl.dot needs K >= 16 and
# smaller heads only occur in toy models, where one fewer compiled variant matters more.
HEAD_DIM_PADS = (64, 128, 256)
# Rows of a tile: a decode tile holds one token's GQA group padded to 16 (tl.dot needs M >= 16);
# larger groups (MQA models) and packed tiles (tokens x group) use 64 rows, 32 for float32 with
# 256-wide heads (64 rows spill registers there even at 8 warps).
DECODE_ROWS = 16
TILE_ROWS = 64
MERGE_PARTS_BLOCK = 16
# KV tokens per decode partition. Fixed (batch-invariant); 512 keeps each program's KV loop long
# enough to pipeline, while a 4k-token sequence still gives 8 programs per KV head to fill the
# GPU at batch 1. Tests override it per call (``partition_size=``) or here.
PARTITION_SIZE = 512
_WHOLE_SEQUENCE = 1 << 30  # packed form: one partition per sequence


@dataclass(frozen=True)
class AttentionConfig:
    """One compiled variant of ``_paged_attention_kernel``: its constexprs and launch options."""

    dtype: torch.dtype
    head_dim_pad: int
    block_rows: int
    packed: bool
    relative: bool  # adds a relative_bias table
    block_n: int
    num_warps: int
    num_stages: int


def attention_config(dtype: torch.dtype, head_dim: int, group: int, packed: bool,
                     relative: bool = False) -> AttentionConfig:
    """The variant the launcher runs for these sizes (the compile test enumerates its range)."""
    d_pad = next_pow2(head_dim, HEAD_DIM_PADS[0])
    fp32 = dtype == torch.float32
    big = TILE_ROWS // 2 if fp32 and d_pad == 256 else TILE_ROWS
    rows = DECODE_ROWS if not packed and group <= DECODE_ROWS else big
    # float32 has no full-precision tensor-core path (the ieee dot runs on FMAs) and 256-wide
    # heads are large: 32-token KV tiles keep their operands in registers. 8 warps except for
    # the small 16-row decode tile. 2 stages: one KV tile load in flight behind the math
    # (3 stages gained nothing for the 16-row decode tile when compiled for sm_90a). These
    # choices are spill-free on sm_90a (tests/test_triton_compile.py).
    block_n = 32 if fp32 or d_pad == 256 else 64
    if relative and (rows == TILE_ROWS or (fp32 and d_pad == 256)):
        # The relative bias adds a [rows, block_n] tile of gathered offsets: without halving
        # block_n these variants spill on sm_90a.
        block_n = 16 if fp32 else 32
    num_warps = 4 if rows == DECODE_ROWS and d_pad <= 128 else 8
    return AttentionConfig(dtype, d_pad, rows, packed, relative, block_n, num_warps,
                           num_stages=2)


def attention_configs() -> list[AttentionConfig]:
    """Every variant ``attention_config`` can return (one representative input per bucket)."""
    configs = {attention_config(dtype, d, group, packed, relative) for dtype in FLOAT_DTYPES
               for d in HEAD_DIM_PADS for group in (1, DECODE_ROWS + 1)
               for packed in (False, True) for relative in (False, True)}
    return sorted(configs, key=repr)


@dataclass(frozen=True)
class AttentionPlan:
    """Host-side launch plan of one step (from shapes only: no device data, no sync)."""

    config: AttentionConfig
    grid: tuple[int, int, int]
    partition_size: int
    max_partitions: int
    workspace_numel: int  # float32 elements; 0 without split-KV


@lru_cache(maxsize=256)
def _plan(num_seqs: int, num_tokens: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
          max_kv_len: int, dtype: torch.dtype, packed: bool, partition_size: int,
          relative: bool) -> AttentionPlan:
    group = num_qo_heads // num_kv_heads
    cfg = attention_config(dtype, head_dim, group, packed, relative)
    if packed:
        # Sequence b's tiles start at cu_seqlens_q[b] * group // rows + b: an upper bound on
        # the tile count that needs no read of cu_seqlens_q.
        grid = (num_tokens * group // cfg.block_rows + num_seqs, num_kv_heads, 1)
        return AttentionPlan(cfg, grid, _WHOLE_SEQUENCE, 1, 0)
    max_partitions = triton.cdiv(max_kv_len, partition_size)
    grid = (num_seqs * triton.cdiv(group, cfg.block_rows), num_kv_heads, max(max_partitions, 1))
    numel = workspace_size(num_seqs, num_qo_heads, head_dim, max_kv_len, 1, partition_size)
    return AttentionPlan(cfg, grid, partition_size, max_partitions, numel)


def plan_attention(num_seqs: int, num_tokens: int, num_qo_heads: int, num_kv_heads: int,
                   head_dim: int, max_blocks_per_seq: int, block_size: int, dtype: torch.dtype,
                   packed: bool, partition_size: Optional[int] = None,
                   relative: bool = False) -> AttentionPlan:
    """Plan a step once on the host; every layer then runs with the same plan and workspace.

    The partition count is bounded by ``max_blocks_per_seq * block_size``, known from the shape
    of block_tables, so neither planning nor running reads seq_lens on the host. relative: the
    step passes a relative_bias table.
    """
    return _plan(num_seqs, num_tokens, num_qo_heads, num_kv_heads, head_dim,
                 max_blocks_per_seq * block_size, dtype, packed, partition_size or PARTITION_SIZE,
                 relative)


def workspace_size(num_seqs: int, num_qo_heads: int, head_dim: int, max_blocks_per_seq: int,
                   block_size: int, partition_size: Optional[int] = None) -> int:
    """float32 elements of the decode-form workspace: partial outputs
    [num_seqs, num_qo_heads, max_partitions, head_dim] then log-sum-exps
    [num_seqs, num_qo_heads, max_partitions]; 0 when one partition covers every sequence."""
    parts = triton.cdiv(max_blocks_per_seq * block_size, partition_size or PARTITION_SIZE)
    return num_seqs * num_qo_heads * parts * (head_dim + 1) if parts > 1 else 0


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    cu_seqlens_q: Optional[torch.Tensor], out: torch.Tensor, *, scale: float,
                    causal: bool, softcap: float, sliding_window: int,
                    alibi_slopes: Optional[torch.Tensor], workspace: Optional[torch.Tensor] = None,
                    partition_size: Optional[int] = None,
                    relative_bias: Optional[torch.Tensor] = None) -> None:
    """Writes ``out`` [num_tokens, num_qo_heads, head_dim]; see the module docstring for shapes.

    workspace: float32, at least ``workspace_size(...)`` elements; with it the call neither
    allocates nor syncs (CUDA-graph safe). softcap / sliding_window: 0 = off. relative_bias:
    [num_qo_heads, 2R + 1] float32, contiguous, or None.
    """
    num_tokens, num_qo_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    _, block_size, num_kv_heads, _ = k_cache.shape
    plan = plan_attention(num_seqs, num_tokens, num_qo_heads, num_kv_heads, head_dim,
                          block_tables.shape[1], block_size, query.dtype,
                          cu_seqlens_q is not None, partition_size, relative_bias is not None)
    cfg = plan.config
    if cfg.packed:
        # Rows that no sequence owns (a cu_seqlens_q not from 0 to T on an unchecked call) are
        # never visited by a tile: NaN, as the guard contract says, rather than stale memory.
        out.fill_(float("nan"))
    # Pointers the kernel never dereferences (no split / no ALiBi) get a float32 view of
    # seq_lens, so every call of a variant has one signature and nothing is allocated.
    unused = seq_lens.view(torch.float32)
    part_out = part_lse = unused
    if plan.workspace_numel:
        if workspace is None:
            workspace = torch.empty(plan.workspace_numel, dtype=torch.float32, device=query.device)
        elif (workspace.dtype != torch.float32 or workspace.numel() < plan.workspace_numel
              or not workspace.is_contiguous()):
            raise ValueError(f"workspace must be contiguous float32 with >= "
                             f"{plan.workspace_numel} elements, got {workspace.dtype} "
                             f"{tuple(workspace.shape)}")
        n_out = num_seqs * num_qo_heads * plan.max_partitions * head_dim
        part_out, part_lse = workspace[:n_out], workspace[n_out:plan.workspace_numel]
    _paged_attention_kernel[plan.grid](
        out, part_out, part_lse, query, k_cache, v_cache, block_tables, seq_lens,
        seq_lens if cu_seqlens_q is None else cu_seqlens_q,
        unused if alibi_slopes is None else alibi_slopes,
        unused if relative_bias is None else relative_bias,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_seqs, num_tokens, num_qo_heads, num_qo_heads // num_kv_heads, head_dim, block_size,
        k_cache.shape[0], block_tables.shape[1], plan.partition_size, max(plan.max_partitions, 1),
        scale, softcap, sliding_window, int(causal), int(alibi_slopes is not None),
        0 if relative_bias is None else relative_bias.shape[1] // 2,
        BLOCK_ROWS=cfg.block_rows, BLOCK_N=cfg.block_n, HEAD_DIM_PAD=cfg.head_dim_pad,
        PACKED=cfg.packed, RELATIVE=cfg.relative, UPCAST=upcast_loads(query.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if plan.workspace_numel:
        _merge_partitions_kernel[(num_seqs, num_qo_heads)](
            out, part_out, part_lse, seq_lens, out.stride(0), out.stride(1),
            num_qo_heads, head_dim, block_tables.shape[1] * block_size, plan.partition_size,
            plan.max_partitions,
            PARTS_BLOCK=MERGE_PARTS_BLOCK, HEAD_DIM_PAD=cfg.head_dim_pad, num_warps=4,
        )
