"""Decode steps with static shapes: ``torch.compile(fullgraph=True)`` and CUDA graphs.

A decode step (one token per sequence) is padded to a batch-size *bucket* (1, 2, 4, 8, then
multiples of 16, as in vLLM / nano-vllm) with inert rows (no KV write, zero length) and a fixed
block-table width, so that every tensor of the step has a shape that depends on the bucket
alone. Its plan lives in the planner's staging buffer, whose regions keep their addresses from
step to step: what a captured graph reads.

- :class:`CompiledDecode`: the model's forward compiled whole (no graph break: the paged
  attention calls the ops' custom-op entry points, nothing reads a device value on the host).
  Runs on CPU and CUDA; one compilation per bucket.
- :class:`CudaGraphDecode`: one CUDA graph per bucket, captured from the largest bucket down
  (sharing one memory pool) and replayed. A step finding the graphs stale (never captured, or
  the caches or the staging buffer reallocated since: their ``version`` changed) runs eagerly,
  then recaptures.

Both call the runner eagerly the first time they see a bucket: that call runs the ops'
argument checks of every layer, which the traced code skips.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdecode.hf.runner import PagedRunner
from fastdecode.plan import StepPlan, StepPlanner


def bucket_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes up to ``max_batch`` (>= 1): 1, 2, 4, 8, 16, 32, 48, ...; the last
    is ``max_batch`` rounded up to its bucket."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    candidates = [1, 2, 4, 8, *range(16, max_batch + 16, 16)]
    top = next(s for s in candidates if s >= max_batch)
    return [s for s in candidates if s <= top]


def bucket_for(batch: int, sizes: list[int]) -> int:
    """The smallest bucket holding ``batch`` rows; ValueError beyond the largest."""
    for size in sizes:
        if size >= batch:
            return size
    raise ValueError(f"a decode step of {batch} sequences exceeds the largest bucket "
                     f"{sizes[-1]}")


class _Static:
    """What runs a padded decode step: the runner, its planner, the buckets and the width."""

    def __init__(self, runner: PagedRunner, planner: StepPlanner, *, max_batch: int,
                 max_blocks_per_seq: int) -> None:
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        self.runner, self.planner = runner, planner
        self.sizes = bucket_sizes(max_batch)
        self.width = max_blocks_per_seq
        self._seen: set[int] = set()

    def plan(self, kv_lens, block_tables, *, token_ids=None, input_ids=None,
             positions=None) -> StepPlan:
        """A decode step of B = len(kv_lens) sequences, padded to its bucket (arguments as in
        :meth:`StepPlanner.build`); its logits are rows ``:B`` of the step's result."""
        b = len(kv_lens)
        return self.planner.build([1] * b, kv_lens, block_tables, token_ids=token_ids,
                                  input_ids=input_ids, positions=positions,
                                  pad_to=bucket_for(b, self.sizes), width=self.width)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 plan: StepPlan) -> torch.Tensor:
        out = self.runner.model(input_ids=input_ids[None], position_ids=positions[None],
                                use_cache=False, fastdecode_plan=plan,
                                fastdecode_kv=self.runner.kv)
        return out.logits[0].float()

    def _first(self, plan: StepPlan) -> Optional[torch.Tensor]:
        """The eager, checked call the first time a bucket is seen (None afterwards)."""
        if plan.num_seqs in self._seen:
            return None
        self._seen.add(plan.num_seqs)
        return self.runner.forward(plan.input_ids, plan.positions, plan)


class CompiledDecode(_Static):
    """Decode steps through ``torch.compile(fullgraph=True, dynamic=False)`` of the model's
    forward (backend: torch.compile's, e.g. "inductor" or "aot_eager")."""

    def __init__(self, runner: PagedRunner, planner: StepPlanner, *, max_batch: int,
                 max_blocks_per_seq: int, backend: str = "inductor") -> None:
        super().__init__(runner, planner, max_batch=max_batch,
                         max_blocks_per_seq=max_blocks_per_seq)
        self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=False,
                                       backend=backend)

    @torch.no_grad()
    def __call__(self, plan: StepPlan) -> torch.Tensor:
        """plan: from :meth:`plan` -> [B, V] float32 logits of the real rows."""
        logits = self._first(plan)
        if logits is None:
            with self.runner.session():
                logits = self._compiled(plan.input_ids, plan.positions, plan)
        return logits[:plan.num_real]


class CudaGraphDecode(_Static):
    """Decode steps replayed from one CUDA graph per bucket (CUDA devices only)."""

    def __init__(self, runner: PagedRunner, planner: StepPlanner, *, max_batch: int,
                 max_blocks_per_seq: int) -> None:
        if runner.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA runner, got {runner.device}")
        super().__init__(runner, planner, max_batch=max_batch,
                         max_blocks_per_seq=max_blocks_per_seq)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, StepPlan, torch.Tensor]] = {}
        self._versions: Optional[tuple[int, int]] = None
        self._pool = None

    def _stale(self) -> bool:
        return self._versions != (self.planner.staging.version, self.runner.kv.version)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs reuse its memory pool). Each
        captured step writes nothing: its slots are all -1."""
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.sizes, reverse=True):
            # Reserve the largest step first, so that no later plan reallocates the staging.
            plan = self.planner.build([1] * size, [1] * size, [[0]] * size,
                                      token_ids=[0] * size, width=self.width,
                                      stage_more=no_writes)
            with self.runner.session():
                self._first(plan)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._forward(plan.input_ids, plan.positions, plan)
            self._graphs[size] = (graph, plan, out)
        self._versions = (self.planner.staging.version, self.runner.kv.version)

    @torch.no_grad()
    def __call__(self, plan: StepPlan) -> torch.Tensor:
        """plan: from :meth:`plan` -> [B, V] float32 logits of the real rows (a view of the
        graph's output: valid until the next step)."""
        if self._stale():  # capturing now would overwrite this plan: run it eagerly first
            logits = self.runner.forward(plan.input_ids, plan.positions, plan)
            self.capture()
            return logits[:plan.num_real]
        graph, static, out = self._graphs[plan.num_seqs]
        # Plans of one bucket share the staging regions; device tensors passed by the caller
        # (the previous step's tokens) are copied into the graph's inputs.
        for mine, given in ((static.input_ids, plan.input_ids),
                            (static.positions, plan.positions)):
            if given.data_ptr() != mine.data_ptr():
                mine.copy_(given, non_blocking=True)
        graph.replay()
        return out[:plan.num_real]


def no_writes(staging) -> None:
    """``stage_more`` of a step that writes no KV (every slot -1): a captured step, or queries
    over cached keys only."""
    field = staging.fields["slot_mapping"]
    staging.host("slot_mapping", field.capacity)[:] = -1
