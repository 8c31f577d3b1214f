"""Turns a scheduled step into one paged forward pass and one sampling call.

The only engine file that builds device tensors (with :mod:`fastdecode.engine.encoder`, its
encoder-decoder form): a step's plan (:mod:`fastdecode.plan`), its sampling parameters
included, is written into preallocated buffers and sent in one copy. The model itself runs
through :class:`fastdecode.hf.runner.PagedRunner`, which owns the per-layer KV caches.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from fastdecode.engine import speculative
from fastdecode.engine.block_manager import cdiv
from fastdecode.engine.draft import DraftJob, DraftRunner
from fastdecode.engine.history_masks import HistoryMasks
from fastdecode.engine.scheduler import ScheduledBatch
from fastdecode.plan import Sampler, SamplingBatch, StepPlan, sampling

if TYPE_CHECKING:
    from fastdecode.engine.encoder import EncoderStep

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
                       max_num_seqs: int, shape: Optional[tuple[int, int, int]] = None) -> int:
    """Size the cache from the memory free now.

    CUDA: 80% of the free GPU memory. CPU: a quarter of the available RAM, at most 8 GiB.
    Never more than ``max_num_seqs`` full-context sequences need. shape: ``(num_layers,
    num_kv_heads, head_dim)`` of the cache (default: the decoder's, from its text config).
    """
    from fastdecode.hf.runner import kv_shape

    layers, kv_heads, head_dim = shape or kv_shape(model)
    block_bytes = (2 * layers * block_size * kv_heads * head_dim
                   * torch.empty((), dtype=kv_dtype).element_size())
    if device.type == "cuda":
        budget = _GPU_CACHE_FRACTION * torch.cuda.mem_get_info(device)[0]
    else:
        budget = min(_CPU_CACHE_FRACTION * _available_ram(), _CPU_CACHE_CAP)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 8192
    return max(1, min(int(budget // block_bytes), max_num_seqs * cdiv(context, block_size)))


@dataclass
class StepInputs:
    """One step, ready to run. plan: the forward pass (its logits_indices: the positions that
    draw a token); sampling: their parameters; copies: copy-on-write ``(src, dst)`` blocks to
    apply first; rows: the batch entries that draw a token; num_entries: the batch's entries;
    masks: n-gram / bad-words bans of the drawn positions' logits (None when no row asks);
    drafts: the speculative drafts of each drawing entry (None when no entry has one: one
    draw per entry); jobs: the draft model's work, with the index in ``drafts`` of each (its
    PENDING drafts are filled in at the start of the step); encoder: the cross-attention of an
    encoder-decoder model's step (:class:`fastdecode.engine.encoder.EncoderStep`), else None.
    Everything was read from the requests by ``prepare``: ``run`` touches no request."""

    plan: StepPlan
    sampling: Optional[SamplingBatch]
    copies: list[tuple[int, int]]
    rows: list[int]
    num_entries: int
    masks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    drafts: Optional[list[list[int]]] = None
    jobs: list[tuple[int, DraftJob]] = field(default_factory=list)
    encoder: Optional["EncoderStep"] = None


class ModelRunner:
    """Runs a decoder-only model (:class:`fastdecode.engine.encoder.EncoderDecoderRunner`
    extends it to encoder-decoder models)."""

    # The decoder's first tokens of every request (encoder-decoder models), or None: the
    # request's prompt.
    decoder_start: Optional[list[int]] = None

    def __init__(self, model, *, block_size: int, num_blocks: Optional[int], max_num_seqs: int,
                 kv_dtype: Optional[torch.dtype], device) -> None:
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, kv_dtype or param.dtype,
                                            self.device, max_num_seqs, self._kv_shape(model))
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.paged = self._paged_runner(model, num_blocks=num_blocks, block_size=block_size,
                                        kv_dtype=kv_dtype, device=self.device)
        self.planner = self.paged.planner(sampling.FIELDS)
        self.sampler = Sampler(model.config.get_text_config().vocab_size, self.device)
        self._history_masks = HistoryMasks(self.device)
        self.draft: Optional[DraftRunner] = None
        self._kv_dtype = kv_dtype

    @staticmethod
    def _kv_shape(model) -> Optional[tuple[int, int, int]]:
        """The cache's (num_layers, num_kv_heads, head_dim); None: the text config's."""
        return None

    @staticmethod
    def _paged_runner(model, **kwargs):
        # Imported here so that ``import fastdecode`` does not pull in transformers.
        from fastdecode.hf.runner import PagedRunner

        return PagedRunner(model, **kwargs)

    def _forward(self, step: StepInputs) -> torch.Tensor:
        """The step's forward pass -> [S, V] float32 logits of its plan's logits_indices."""
        plan = step.plan
        return self.paged.forward(plan.input_ids, plan.positions, plan)

    def attach_draft(self, model) -> None:
        """Give requests with ``num_speculative_tokens`` a draft model (its cache mirrors this
        runner's: same block count and size)."""
        self.draft = DraftRunner(model, vocab_size=self.sampler.vocab_size,
                                 block_size=self.block_size, num_blocks=self.num_blocks,
                                 kv_dtype=self._kv_dtype, device=self.device)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """The step's plan, read from the requests now and sent to the device in one copy.

        The Engine calls this under its lock: ``abort`` from another thread may free a block
        table at any other moment. ``run`` reads nothing that ``abort`` changes.
        """
        seqs, num_new = batch.seqs, batch.num_new
        rows = [i for i in range(len(seqs)) if batch.samples(i)]
        drafts = [batch.drafts[i] for i in rows] if any(batch.drafts) else None
        # One draw per drawing entry, or per verified position when some entry has drafts.
        drawing = ([seqs[i] for i in rows] if drafts is None
                   else speculative.positions([seqs[i] for i in rows], drafts))
        staged: list[SamplingBatch] = []

        def stage(staging) -> None:
            banned = [(j, t) for j, s in enumerate(drawing)
                      if s.num_generated < s.params.min_new_tokens for t in sorted(s.stop_ids)]
            staged.append(self.sampler.stage(
                staging, [s.params for s in drawing], [s.num_tokens for s in drawing],
                [s.token_ids for s in drawing], banned))

        plan = self.planner.build(
            num_new, [s.num_computed + n for s, n in zip(seqs, num_new)],
            [s.block_table for s in seqs],
            token_ids=itertools.chain.from_iterable(
                s.token_ids[s.num_computed:s.num_computed + n - len(d)] + d
                for s, n, d in zip(seqs, num_new, batch.drafts or itertools.repeat([]))),
            logits_rows=None if len(rows) == len(seqs) and drafts is None else rows,
            logits_counts=None if drafts is None else [len(d) + 1 for d in drafts],
            stage_more=stage if rows else None)
        masks = (self._history_masks.prepare(drawing) if HistoryMasks.needed(drawing) else None)
        return StepInputs(plan, staged[0] if staged else None, list(batch.block_copies), rows,
                          len(seqs), masks, drafts, self._jobs(batch, rows))

    @staticmethod
    def _jobs(batch: ScheduledBatch, rows: list[int]) -> list[tuple[int, DraftJob]]:
        """The draft model's work of the step, read from the requests now."""
        ends = list(itertools.accumulate(batch.num_new))
        jobs = []
        for j, i in enumerate(rows):
            d = batch.drafts[i] if batch.drafts else []
            if d and d[0] == speculative.PENDING:
                seq = batch.seqs[i]
                jobs.append((j, DraftJob(seq.token_ids[-1], seq.num_computed,
                                         list(seq.block_table), len(d), ends[i] - len(d))))
        return jobs

    @torch.inference_mode()
    def run(self, step: StepInputs) -> tuple[list[Optional[list[int]]], dict[int, str]]:
        """The forward pass and the sampling call.

        Returns ``(tokens, errors)``: per batch entry its new tokens (the accepted drafts, then
        the token drawn after them; -1: no finite logit) or None for a prompt chunk short of
        its sequence's end; and, for entries whose sampling raised, why. A forward-pass
        failure raises (it is no single request's fault).
        """
        self.paged.kv.copy_blocks(step.copies)
        if self.draft is not None:
            self.draft.paged.kv.copy_blocks(step.copies)
        plan, drafts = step.plan, step.drafts
        if step.jobs:
            drafts = list(drafts)
            made = self.draft.draft([job for _, job in step.jobs])
            for (j, job), d in zip(step.jobs, made):
                drafts[j] = d
                plan.input_ids[job.offset:job.offset + job.count] = torch.tensor(d)
        logits = self._forward(step)
        if self.draft is not None:
            self.draft.mirror(plan)
        tokens: list[Optional[list[int]]] = [None] * step.num_entries
        errors: dict[int, str] = {}
        if step.rows and step.sampling is not None:
            if step.masks is not None:
                logits = step.masks(logits)
            drawn, failed = self._sample_rows(logits, step.sampling)
            failed.update((j, f"sampling failed: {why}") for j, why in
                          step.sampling.errors.items())
            owner = list(range(len(step.rows)))  # the drawing entry of each drawn position
            if drafts is None:
                new = [[tok] for tok in drawn]
            else:
                new = speculative.accept(drawn, drafts)
                owner = [j for j, d in enumerate(drafts) for _ in range(len(d) + 1)]
            for i, toks in zip(step.rows, new):
                tokens[i] = toks
            errors = {step.rows[owner[j]]: why for j, why in failed.items()}
        return tokens, errors

    def _sample_rows(self, logits: torch.Tensor,
                     batch: SamplingBatch) -> tuple[list[int], dict[int, str]]:
        """One batched sampling call; if it raises, each row alone, so that only the rows that
        fail on their own fail (a seeded row draws the same token either way)."""
        try:
            return self._sample(logits, batch).tolist(), {}
        except Exception:
            pass  # the rows alone, below, tell which fail and why
        drawn, failed = [-1] * len(batch), {}
        for j in range(len(batch)):
            try:
                drawn[j] = int(self._sample(logits[j:j + 1], batch.row(j))[0])
            except Exception as exc:
                failed[j] = f"sampling failed: {type(exc).__name__}: {exc}"
        return drawn, failed

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits: [S, V] float32 of the drawing entries' last tokens -> [S] int64."""
        return self.sampler.sample(logits, batch)
