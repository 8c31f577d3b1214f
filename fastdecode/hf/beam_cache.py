"""The paged KV cache of beam search: beams of one prompt share its blocks.

Block tables live in the engine's :class:`~fastdecode.engine.block_manager.BlockManager` (one
implementation of sharing and copy-on-write). The prompt is computed once per prompt, not once
per beam; its table is then forked into ``num_beams`` tables. After each step every beam takes a
fork of its parent's table (reference counts only) and the old tables are released, so blocks no
surviving beam descends from return to the pool. A beam writing its next token into a block it
shares gets a private copy of that block first (the last, partial block: full blocks are never
written again), which the step applies to every layer's cache before the forward pass.
"""

from __future__ import annotations

import torch

from fastdecode.engine.block_manager import BlockManager, cdiv
from fastdecode.hf import compat
from fastdecode.hf.prepare import Prepared
from fastdecode.hf.seq2seq import paged_runner
from fastdecode.hf.steppers import fill_hf_cache, masked_tail


class BeamKV:
    """Runs ``num_beams`` beams for each of the B prompts of ``prepared`` over one paged pool.

    ``prepared`` holds B * num_beams rows (each prompt repeated, as ``generate`` expands them),
    masked as the paged path takes them (:class:`~fastdecode.hf.steppers.PagedStepper`). Rows
    of the decode steps are beams, prompt after prompt: row ``b * K + j`` is beam j of prompt b.
    """

    def __init__(self, model, prepared: Prepared, num_beams: int, max_new_tokens: int, *,
                 block_size: int = 16, backend: str = "auto"):
        self.prepared = prepared
        self.num_beams = num_beams
        self.block_size = block_size
        mask = prepared.mask[::num_beams]
        self.lens = mask.sum(-1).tolist()  # the one host read of the prompt layout
        self.batch = len(self.lens)
        # Room for the prompts and one block per beam; grown on demand.
        blocks = sum(cdiv(n, block_size) + num_beams for n in self.lens)
        self.manager = BlockManager(blocks, block_size)
        self.runner = paged_runner(model, prepared, num_blocks=blocks, block_size=block_size,
                                   backend=backend)
        self.planner = self.runner.planner()
        self.device = self.runner.device
        self.session = self.runner.session
        self.tables: list[list[int]] = []
        self._kv = torch.tensor(self.lens, dtype=torch.int64).repeat_interleave(num_beams)
        self._pos = None
        self._types = None

    @property
    def blocks_in_use(self) -> int:
        """KV blocks some beam holds."""
        return self.manager.num_used_blocks

    def prefill(self) -> torch.Tensor:
        """Computes each prompt once -> [B * num_beams, V] float32 (the prompt's logits repeated
        for each of its beams)."""
        p, kwargs, k = self.prepared, self.prepared.model_kwargs, self.num_beams
        mask = p.mask[::k]
        keep = mask.bool()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = p.mask.cumsum(-1) - 1
        types = kwargs.get("token_type_ids")
        embeds = kwargs.get("inputs_embeds")
        prompts = []
        for n in self.lens:
            table: list[int] = []
            self._append(table, 0, n)
            prompts.append(table)

        def packed(t):  # [B * K, S, ...] -> [T, ...], the first beam of each prompt
            return None if t is None else t[::k][keep].to(self.device)

        plan = self.planner.build(self.lens, self.lens, prompts,
                                  input_ids=packed(p.input_ids) if embeds is None else None,
                                  positions=packed(positions))
        logits = self.runner.forward(plan.input_ids, plan.positions, plan,
                                     inputs_embeds=packed(embeds), token_type_ids=packed(types))
        masked_tail(self.runner, self.planner, p, prompts, self.lens, logits, stride=k)
        self.tables = [self.manager.fork(t) if j else t for t in prompts for j in range(k)]
        self._pos = (positions[:, -1] + 1).to(self.device)
        if types is not None:
            self._types = types[:, -1].to(self.device)
        return logits.repeat_interleave(k, dim=0)

    def reorder(self, parents: list[int]) -> None:
        """parents: for each beam row, the row it continues (within its own prompt's rows)."""
        old = self.tables
        self.tables = [self.manager.fork(old[i]) for i in parents]
        for table in old:
            self.manager.free(table)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B * num_beams] int64, each beam's new token -> [B * num_beams, V] float32."""
        copies = []
        kv = self._kv.tolist()
        for table, n in zip(self.tables, kv):
            copies += self._append(table, n, 1)
        self.runner.kv.copy_blocks(copies)
        plan = self.planner.build([1] * len(self.tables), [n + 1 for n in kv], self.tables,
                                  input_ids=tokens.to(self.device), positions=self._pos)
        logits = self.runner.forward(plan.input_ids, plan.positions, plan,
                                     token_type_ids=self._types)
        self._kv += 1
        self._pos += 1
        return logits

    def cache(self):
        """HF's cache object of the call (None without one), filled as HF leaves it: the running
        beams' keys and values, in HF's left-padded layout."""
        cache = self.prepared.model_kwargs.get(compat.cache_name())
        if cache is None:
            return None
        width = self.prepared.mask.shape[1] + int(self._kv[0]) - self.lens[0]
        return fill_hf_cache(cache, self.runner, self._tables(), self._kv, self.prepared.mask,
                             width)

    def _tables(self) -> torch.Tensor:
        """[B * K, M] int32 block tables of the beams (padded with block 0) on the device."""
        width = max(len(t) for t in self.tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables],
                            dtype=torch.int32).view(len(self.tables), width).to(self.device)

    def _append(self, table: list[int], num_computed: int, num_new: int) -> list[tuple[int, int]]:
        """The block manager's ``append_slots``, growing the pool (manager and every layer's
        cache) when it runs out."""
        manager = self.manager
        need = manager.blocks_needed(table, num_computed, num_new)
        if need > manager.num_free_blocks:
            size = max(2 * manager.num_blocks, manager.num_used_blocks + need)
            manager.grow(size)
            self.runner.grow(size)
        return manager.append_slots(table, num_computed, num_new)
