"""The step plan: everything one forward pass needs besides the weights, built once per step.

A step packs the new tokens of B sequences into one flat batch of T tokens. :class:`StepPlanner`
turns host-side scheduling data (per sequence: new tokens, KV length, block table) into a
:class:`StepPlan` of device tensors, computed with numpy into one :class:`~.staging.Staging`
buffer and sent with one copy. Every layer reads the same plan (its :class:`AttentionMeta`);
nothing in a layer's call reads device data on the host.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from fastdecode.plan.cascade import SharedPrefix, plan_shared_prefix
from fastdecode.plan.staging import Staging

if TYPE_CHECKING:
    from fastdecode.plan.attention import PagedKVCache
    from fastdecode.plan.sampling import SamplingBatch


@dataclass
class AttentionMeta:
    """How one step's tokens read and write one set of paged caches.

    block_tables: [B, M] int32; seq_lens: [B] int32 KV lengths after this step's tokens;
    cu_seqlens_q: [B + 1] int32 offsets of each sequence's tokens in the packed batch;
    slot_mapping: [T] int64 cache slot of each new token (-1 = not written), or None for a
    read-only set (an encoder's keys, for cross-attention); decode_only: one token per sequence
    (the kernels' decode form runs); causal: bottom-right causal mask within each sequence;
    workspace: float32 scratch of split-KV decode kernels, shared by every layer, or None;
    shared_prefix: the leading blocks every sequence of a decode step reads (CPU, see
    :mod:`fastdecode.plan.cascade`), or None.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    slot_mapping: Optional[torch.Tensor]
    decode_only: bool
    causal: bool = True
    workspace: Optional[torch.Tensor] = None
    shared_prefix: Optional[SharedPrefix] = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass
class StepPlan:
    """One forward pass. input_ids, positions: [T] int64 (input_ids None when the caller feeds
    embeddings); attn: the self-attention metadata; logits_indices: [S] int64 packed rows whose
    logits the step needs (the rows that sample), or None for every row (decode form);
    sampling: the rows' sampling parameters, when the planner staged them; num_real: rows
    before padding to a static batch size (the rest are inert: no write, zero-length)."""

    input_ids: Optional[torch.Tensor]
    positions: torch.Tensor
    attn: AttentionMeta
    logits_indices: Optional[torch.Tensor]
    num_real: int
    sampling: Optional["SamplingBatch"] = None

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.attn.num_seqs


# Staging fields of a plan, small ones first (an upload copies up to the last one written).
_FIELDS = {"seq_lens": torch.int32, "cu_seqlens_q": torch.int32, "logits_indices": torch.int64,
           "input_ids": torch.int64, "positions": torch.int64, "slot_mapping": torch.int64}


@functools.lru_cache(maxsize=64)
def _arange_cached(n: int) -> np.ndarray:
    a = np.arange(n, dtype=np.int64)
    a.flags.writeable = False
    return a


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)`` (int64, read-only), cached for the small sizes steps repeat."""
    return _arange_cached(n) if n <= 4096 else np.arange(n, dtype=np.int64)


class StepPlanner:
    """Builds step plans for a paged cache of ``block_size`` tokens per block on ``device``.

    kv: the caches the plans are for (sizes the split-KV workspace); extra_fields: more
    staging fields (name -> dtype) for other per-step host data, e.g. sampling parameters,
    uploaded with the plan. Buffers start small and grow (see :class:`Staging`).
    """

    def __init__(self, device, block_size: int, *, kv: Optional["PagedKVCache"] = None,
                 extra_fields: Optional[dict[str, torch.dtype]] = None) -> None:
        self.device = torch.device(device)
        self.block_size = block_size
        self.kv = kv
        fields = {name: (dtype, 64) for name, dtype in {**_FIELDS, **(extra_fields or {})}.items()}
        fields["block_tables"] = (torch.int32, 1024)  # last: its used part varies the most
        self.staging = Staging(fields, self.device)

    def build(self, query_lens: Sequence[int], kv_lens: Sequence[int],
              block_tables: Union[Sequence[Sequence[int]], np.ndarray], *,
              token_ids: Optional[Iterable[int]] = None, input_ids: Optional[torch.Tensor] = None,
              positions: Union[None, Sequence[int], torch.Tensor] = None,
              logits_rows: Optional[Sequence[int]] = None,
              logits_counts: Optional[Sequence[int]] = None, pad_to: Optional[int] = None,
              width: Optional[int] = None, stage_more=None, upload: bool = True) -> StepPlan:
        """Plan a step of B sequences (T = sum(query_lens) tokens).

        query_lens: new tokens per sequence (>= 1); kv_lens: KV length of each after the step;
        block_tables: block ids of each (at least ceil(kv_len / P)), ragged lists or a [B, M]
        integer array; token_ids: the T new ids on the host, or input_ids: [T] int64 on the
        device (or neither: embeddings fed); positions: T position ids on the host, or [T]
        int64 on the device (default: each token's KV index); logits_rows: the sequences
        whose last token's logits are needed (default: all); logits_counts: for each of
        them, how many of its last tokens' logits (default 1; more: the positions that verify
        speculative drafts), in packed order; pad_to: a decode step (one token
        per sequence) padded with inert rows to this many; width: block-table columns M
        (default: the longest table); stage_more: ``f(staging)`` writing extra fields before
        the upload; upload: False leaves the copy to the caller (``staging.upload()``).
        Raises ValueError for inconsistent lengths.
        """
        stg, size = self.staging, self.block_size
        q = np.asarray(query_lens, dtype=np.int64)
        kv = np.asarray(kv_lens, dtype=np.int64)
        dense = isinstance(block_tables, np.ndarray)
        n_tab = (np.full(len(block_tables), block_tables.shape[1], np.int64) if dense else
                 np.fromiter(map(len, block_tables), np.int64, len(block_tables)))
        b = len(q)
        if not len(kv) == len(n_tab) == b or b == 0:
            raise ValueError("query_lens, kv_lens and block_tables need one entry per sequence, "
                             f"got {len(q)}, {len(kv)}, {len(n_tab)}")
        bad = (q < 1) | (q > kv) | (kv > n_tab * size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"sequence {i}: {q[i]} new tokens, KV length {kv[i]} and "
                             f"{n_tab[i]} blocks of {size} are inconsistent")
        tokens = int(q.sum())
        rows = b if pad_to is None else pad_to
        if pad_to is not None and (tokens != b or pad_to < b):
            raise ValueError(f"pad_to={pad_to} needs a decode step of at most {pad_to} "
                             f"sequences, got {b} sequences with {tokens} tokens")
        width = int(n_tab.max()) if width is None else width
        if width < n_tab.max():
            raise ValueError(f"width {width} is narrower than a block table of {n_tab.max()}")
        if logits_counts is not None and logits_rows is None:
            logits_rows = range(b)
        counts = None if logits_counts is None else np.asarray(logits_counts, dtype=np.int64)
        n_logits = (rows if logits_rows is None else
                    len(logits_rows) if counts is None else int(counts.sum()))
        t_rows = tokens + rows - b
        stg.wait()
        stg.reserve(input_ids=t_rows, positions=t_rows, slot_mapping=t_rows, seq_lens=rows,
                    cu_seqlens_q=rows + 1, logits_indices=n_logits, block_tables=rows * width)

        tables = stg.host("block_tables", rows * width).reshape(rows, width)
        if dense:
            tables[:b, :block_tables.shape[1]] = block_tables
            tables[:b, block_tables.shape[1]:] = 0
            tables[b:] = 0
        else:
            tables.fill(0)
            flat = np.fromiter(itertools.chain.from_iterable(block_tables), np.int32,
                               int(n_tab.sum()))
            seq_of = np.repeat(np.arange(b), n_tab)
            starts = np.cumsum(n_tab) - n_tab
            tables[seq_of, np.arange(len(flat)) - starts[seq_of]] = flat

        cu = stg.host("cu_seqlens_q", rows + 1)
        lens = stg.host("seq_lens", rows)
        lens[:b] = kv
        lens[b:] = 0
        slots = stg.host("slot_mapping", t_rows)
        decode = tokens == b
        if decode:  # the common step: one token per sequence, at KV index kv - 1
            cu[:] = _arange(rows + 1)  # padding rows: one inert token each
            kv_index = kv - 1
            slots[:b] = tables[_arange(b), kv_index // size] * size + kv_index % size
        else:
            cu[0] = 0
            np.cumsum(q, out=cu[1:])
            seq_of = np.repeat(_arange(b), q)
            kv_index = _arange(tokens) - cu[seq_of] + (kv - q)[seq_of]
            slots[:tokens] = (tables[seq_of, kv_index // size].astype(np.int64) * size
                              + kv_index % size)
        slots[tokens:] = -1
        on_device = isinstance(positions, torch.Tensor)
        if not on_device:
            pos = stg.host("positions", t_rows)
            pos[:tokens] = kv_index if positions is None else positions
            pos[tokens:] = 0
        if token_ids is not None:
            stg.host("input_ids", t_rows)[:tokens] = np.fromiter(token_ids, np.int64, tokens)
        if token_ids is not None or (input_ids is not None and rows > b):
            stg.host("input_ids", t_rows)[tokens:] = 0
        if logits_rows is None and tokens > b:  # packed: each sequence's last token
            logits_rows = range(b)
        if logits_rows is not None:
            picked = stg.host("logits_indices", n_logits)
            ends = cu[np.asarray(logits_rows, dtype=np.int64) + 1]
            if counts is None:
                picked[:] = ends - 1
            else:  # the last counts[i] tokens of each sequence, in order
                before = np.repeat(np.cumsum(counts) - counts, counts)
                picked[:] = np.repeat(ends - counts, counts) + _arange(n_logits) - before
        if stage_more is not None:
            stage_more(stg)
        if upload:
            stg.upload()

        ids_dev = input_ids  # already on the device: used as it is, unless padded
        if token_ids is not None or (input_ids is not None and rows > b):
            ids_dev = stg.device_view("input_ids", t_rows)
            if input_ids is not None:
                ids_dev[:tokens].copy_(input_ids, non_blocking=True)
        workspace = shared = None
        if decode and self.kv is not None:
            workspace = self.kv.workspace(rows, width)
        if decode and rows == b and self.kv is not None and self.kv.shared_prefix_decode:
            shared = plan_shared_prefix(tables, kv, size)  # padded (static) steps: one call
        meta = AttentionMeta(
            block_tables=stg.device_view("block_tables", rows * width).view(rows, width),
            seq_lens=stg.device_view("seq_lens", rows),
            cu_seqlens_q=stg.device_view("cu_seqlens_q", rows + 1),
            slot_mapping=stg.device_view("slot_mapping", t_rows), decode_only=decode,
            workspace=workspace, shared_prefix=shared)
        return StepPlan(
            input_ids=ids_dev, positions=positions if on_device else stg.device_view(
                "positions", t_rows), attn=meta, num_real=b,
            logits_indices=None if logits_rows is None else stg.device_view("logits_indices",
                                                                            n_logits))
