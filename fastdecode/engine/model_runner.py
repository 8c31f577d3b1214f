"""Turns a scheduled step into one paged forward pass and one ``ops.sample`` call.

The only engine file that builds device tensors. The model itself runs through
:class:`fastdecode.hf.runner.PagedRunner`, which owns the per-layer KV caches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from fastdecode import ops
from fastdecode.engine.block_manager import cdiv
from fastdecode.engine.history_masks import HistoryMasks
from fastdecode.engine.scheduler import ScheduledBatch
from fastdecode.engine.sequence import Sequence

if TYPE_CHECKING:
    from fastdecode.hf.context import PagedContext

_CPU_CACHE_FRACTION = 0.25   # of the RAM available now
_CPU_CACHE_CAP = 8 << 30     # bytes: a CPU decodes too slowly to use a larger cache
_GPU_CACHE_FRACTION = 0.8    # of the free GPU memory; the rest is left for activations


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_num_blocks(model, block_size: int, kv_dtype: torch.dtype, device: torch.device,
                       max_num_seqs: int) -> int:
    """Size the cache from the memory free now.

    CUDA: 80% of the free GPU memory. CPU: a quarter of the available RAM, at most 8 GiB.
    Never more than ``max_num_seqs`` full-context sequences need.
    """
    from fastdecode.hf.runner import kv_shape

    layers, kv_heads, head_dim = kv_shape(model)
    block_bytes = (2 * layers * block_size * kv_heads * head_dim
                   * torch.empty((), dtype=kv_dtype).element_size())
    if device.type == "cuda":
        budget = _GPU_CACHE_FRACTION * torch.cuda.mem_get_info(device)[0]
    else:
        budget = min(_CPU_CACHE_FRACTION * _available_ram(), _CPU_CACHE_CAP)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 8192
    return max(1, min(int(budget // block_bytes), max_num_seqs * cdiv(context, block_size)))


def _per_row(values: list, dtype: torch.dtype, device: torch.device):
    """A Python number when every row agrees (lets the sampler skip disabled stages)."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass
class StepInputs:
    """One step, ready to run. input_ids, positions: [T] int64; ctx: the paged attention
    context; copies: copy-on-write ``(src, dst)`` blocks to apply first; rows: the batch entries
    that draw a token, seqs their sequences; num_entries: the batch's entries."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: "PagedContext"
    copies: list[tuple[int, int]]
    rows: list[int]
    seqs: list[Sequence]
    num_entries: int


class ModelRunner:
    def __init__(self, model, *, block_size: int, num_blocks: Optional[int], max_num_seqs: int,
                 kv_dtype: Optional[torch.dtype], device) -> None:
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, kv_dtype or param.dtype,
                                            self.device, max_num_seqs)
        # Imported here so that ``import fastdecode`` does not pull in transformers.
        from fastdecode.hf.context import PagedContext
        from fastdecode.hf.runner import PagedRunner

        self._build_context = PagedContext.build

        self.block_size = block_size
        self.num_blocks = num_blocks
        self.paged = PagedRunner(model, num_blocks=num_blocks, block_size=block_size,
                                 kv_dtype=kv_dtype, device=self.device)
        self._history_masks = HistoryMasks(self.device)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's forward inputs, read from the requests now.

        The Engine calls this under its lock: ``abort`` from another thread may free a block
        table at any other moment. ``run`` reads nothing that ``abort`` changes.
        """
        ids: list[int] = []
        positions: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new):
            start = seq.num_computed
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
        ctx = self._build_context([s.block_table for s in batch.seqs],
                                 [s.num_computed + n for s, n in zip(batch.seqs, batch.num_new)],
                                 batch.num_new, self.block_size, self.device)
        rows = [i for i in range(len(batch.seqs)) if batch.samples(i)]
        return StepInputs(torch.tensor(ids, dtype=torch.int64, device=self.device),
                          torch.tensor(positions, dtype=torch.int64, device=self.device),
                          ctx, list(batch.block_copies), rows, [batch.seqs[i] for i in rows],
                          len(batch.seqs))

    @torch.inference_mode()
    def run(self, step: StepInputs) -> tuple[list[Optional[int]], dict[int, str]]:
        """The forward pass and the sampling call.

        Returns ``(tokens, errors)``: per batch entry the token drawn (-1: no finite logit) or
        None for a prompt chunk short of its sequence's end; and, for entries whose sampling
        raised, why. A forward-pass failure raises (it is no single request's fault).
        """
        self._copy_blocks(step.copies)
        logits = self.paged.forward(step.input_ids, step.positions, step.ctx)
        tokens: list[Optional[int]] = [None] * step.num_entries
        errors: dict[int, str] = {}
        if step.rows:
            if len(step.rows) < step.num_entries:
                logits = logits[torch.tensor(step.rows, device=self.device)]
            drawn, failed = self._sample_rows(logits, step.seqs)
            for i, tok in zip(step.rows, drawn):
                tokens[i] = tok
            errors = {step.rows[j]: why for j, why in failed.items()}
        return tokens, errors

    def _sample_rows(self, logits: torch.Tensor,
                     seqs: list[Sequence]) -> tuple[list[int], dict[int, str]]:
        """One batched sampling call; if it raises, each row alone, so that only the rows that
        fail on their own fail (a seeded row draws the same token either way)."""
        try:
            return self._sample(logits, seqs).tolist(), {}
        except Exception:
            pass  # the rows alone, below, tell which fail and why
        drawn, failed = [-1] * len(seqs), {}
        for j, seq in enumerate(seqs):
            try:
                drawn[j] = int(self._sample(logits[j:j + 1], [seq])[0])
            except Exception as exc:
                failed[j] = f"sampling failed: {type(exc).__name__}: {exc}"
        return drawn, failed

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits: [B, V] float32 of each sequence's last token. Returns [B] int64."""
        dev = self.device
        params = [s.params for s in seqs]
        banned = [(i, sorted(s.stop_ids)) for i, s in enumerate(seqs)
                  if s.num_generated < s.params.min_new_tokens and s.stop_ids]
        if banned:
            logits = logits.clone()  # the runner's buffer is not ours to modify
            for i, stop in banned:
                logits[i, torch.tensor(stop, device=dev)] = float("-inf")
        if HistoryMasks.needed(seqs):
            logits = self._history_masks(logits, seqs)
        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            width = max(s.num_tokens for s in seqs)
            seen = torch.tensor([s.token_ids + [-1] * (width - s.num_tokens)
                                 if p.repetition_penalty != 1.0 else [-1] * width
                                 for s, p in zip(seqs, params)], dtype=torch.int64, device=dev)
        return ops.sample(
            logits,
            temperature=_per_row([float(p.temperature) for p in params], torch.float32, dev),
            # float64 holds any top_k (beyond int64 too: off) for the op to check and map.
            top_k=_per_row([p.top_k for p in params], torch.float64, dev),
            top_p=_per_row([float(p.top_p) for p in params], torch.float32, dev),
            min_p=_per_row([float(p.min_p) for p in params], torch.float32, dev),
            repetition_penalty=_per_row([float(p.repetition_penalty) for p in params],
                                        torch.float32, dev),
            seen_tokens=seen,
            seeds=torch.tensor([-1 if p.seed is None else p.seed for p in params],
                               dtype=torch.int64, device=dev),
            offsets=torch.tensor([s.num_tokens for s in seqs], dtype=torch.int64, device=dev))

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write copies of shared blocks, in every layer's K and V cache."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        for cache in (*self.paged.k_caches, *self.paged.v_caches):
            cache[dst] = cache[src]
