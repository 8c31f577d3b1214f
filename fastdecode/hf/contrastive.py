"""Contrastive search (Su et al., 2022) with transformers' pre-4.56 semantics, on the paged cache.

Each step takes the top-k tokens of the processed next-token distribution, runs all B x k
candidates in one packed forward (each candidate is its own sequence whose last, partly filled
block is a scratch copy of its row's, so candidates never see each other), and picks per row

    argmax_c  (1 - alpha) * p(c) - alpha * max_s cos(h_c, h_s)

where h_c is the candidate's last hidden state and h_s runs over the row's context (prompt tokens
under the attention mask, then every chosen token). The chosen candidate's scratch block is swapped
into its row's block table, so its keys and values are kept without a second forward; the others'
writes are dropped with their scratch blocks, and the chosen candidate's logits are the next step's.

The loop is :func:`fastdecode.hf.loop.run`: :class:`Selector` ranks (and asks the stepper to
branch), :class:`BranchingStepper.decode` only commits the choice.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch

from fastdecode.hf.prepare import Prepared
from fastdecode.hf.sampling import TokenSelector
from fastdecode.hf.steppers import PagedStepper


class BranchingStepper(PagedStepper):
    """A :class:`PagedStepper` that can run ``width`` candidate tokens per row as one step and
    keep one of them, and that records the last hidden states of the context.

    context: [B, C, D] float32 hidden states (valid where ``context_mask``), C growing by
    doubling up to L + max_new_tokens; context_mask: [B, C] bool; filled: columns written so far.
    """

    def __init__(self, model, prepared: Prepared, max_new_tokens: int, width: int, *,
                 backend: str = "auto"):
        super().__init__(model, prepared, max_new_tokens, backend=backend)
        self.width = width
        first = self.runner.num_blocks
        self.runner.grow(first + self.batch * width)
        # [B, k] block ids (host): each candidate's scratch copy of its row's last block.
        self._scratch = first + np.arange(self.batch * width, dtype=np.int32).reshape(
            self.batch, width)
        self._hook_model = model.base_model
        self._hidden: Optional[torch.Tensor] = None
        self._limit = prepared.mask.shape[1] + max_new_tokens
        self.context: Optional[torch.Tensor] = None
        self.context_mask: Optional[torch.Tensor] = None
        self.filled = prepared.mask.shape[1]
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @contextmanager
    def _capture(self) -> Iterator[None]:
        """Keep the decoder's final hidden states [T, D] (``hidden_states[-1]`` in HF terms)."""
        def hook(module, args, output):
            states = output[0] if isinstance(output, tuple) else output.last_hidden_state
            self._hidden = states[0].float()
        handle = self._hook_model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def prefill(self) -> torch.Tensor:
        with self._capture():
            logits = super().prefill()
        keep = self.prepared.mask.bool().to(self.device)
        self.context = torch.zeros(self.batch, keep.shape[1], self._hidden.shape[-1],
                                   device=self.device)
        self.context[keep] = self._hidden
        self.context_mask = keep
        return logits

    def branch(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """candidates: [B, k] int64 -> (logits [B, k, V] float32, hidden [B, k, D] float32) of
        each candidate appended to its row; the rows' caches are unchanged."""
        if self._longest >= self.blocks_per_row * self.block_size:
            self._grow()
        k, count = self.width, self.batch * self.width
        kv = np.repeat(self._kv, k)  # [B * k] host
        column = kv // self.block_size
        tables = np.repeat(self._tables, k, axis=0)
        every = np.arange(count)
        scratch = self._scratch.reshape(-1)
        source = torch.from_numpy(tables[every, column].astype(np.int64)).to(self.device)
        target = torch.from_numpy(scratch.astype(np.int64)).to(self.device)
        for cache in (*self.runner.k_caches, *self.runner.v_caches):
            cache[target] = cache[source]
        tables[every, column] = scratch
        plan = self.planner.build(np.ones(count, np.int64), kv + 1, tables,
                                  input_ids=candidates.flatten().to(self.device),
                                  positions=np.repeat(self._pos, k))
        types = None if self._types is None else self._types.repeat_interleave(k)
        with self._capture():
            logits = self.runner.forward(plan.input_ids, plan.positions, plan,
                                         token_type_ids=types)
        return logits.view(self.batch, k, -1), self._hidden.view(self.batch, k, -1)

    def keep(self, choice: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """Remember which candidate of each row ([B] int64) the next ``decode`` commits."""
        self._pending = (choice, logits, hidden)

    def decode(self, tokens: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """Commit the kept candidates (``tokens`` were chosen among them): their scratch blocks
        replace the rows' blocks, the replaced blocks become scratch. Returns their logits."""
        choice, logits, hidden = self._pending
        picked = np.asarray(choice.tolist(), dtype=np.int64)  # one host read per step
        rows = np.arange(self.batch)
        column = self._kv // self.block_size
        chosen = self._scratch[rows, picked]
        replaced = self._tables[rows, column]
        self._tables[rows, column] = chosen
        self._scratch[rows, picked] = replaced
        if self.filled == self.context.shape[1]:
            self._widen()
        dev_rows = torch.arange(self.batch, device=self.device)
        self.context[:, self.filled] = hidden[dev_rows, choice]
        self.context_mask[:, self.filled] = True
        self.filled += 1
        self._longest += 1
        self._kv = self._kv + 1
        self._pos = self._pos + 1
        return logits[dev_rows, choice]

    def _widen(self) -> None:
        """Double the context's columns (at most L + max_new_tokens): memory for the tokens
        actually produced, as the paged cache grows."""
        width = min(self._limit, 2 * self.context.shape[1] + 16)
        grow = width - self.context.shape[1]
        self.context = torch.nn.functional.pad(self.context, (0, 0, 0, grow))
        self.context_mask = torch.nn.functional.pad(self.context_mask, (0, grow))


class Selector:
    """Contrastive-search token choice: HF's processors, then top-k candidates ranked by
    confidence minus degeneration penalty (``penalty_alpha``)."""

    def __init__(self, processors: TokenSelector, stepper: BranchingStepper, alpha: float):
        self.processors, self.stepper, self.alpha = processors, stepper, alpha

    def __call__(self, logits: torch.Tensor, sequences: torch.Tensor, seen: Optional[torch.Tensor],
                 ban_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as :class:`~fastdecode.hf.sampling.TokenSelector`."""
        _, scores = self.processors(logits, sequences, seen, ban_eos)
        top_probs, top_ids = scores.softmax(-1).topk(self.stepper.width, dim=-1)
        cand_logits, hidden = self.stepper.branch(top_ids)
        choice = rank(self.stepper.context[:, :self.stepper.filled],
                      self.stepper.context_mask[:, :self.stepper.filled], hidden,
                      top_probs.to(hidden.device), self.alpha)
        self.stepper.keep(choice, cand_logits, hidden)
        return top_ids.gather(1, choice[:, None].to(top_ids.device))[:, 0], scores


def rank(context: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor,
         probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """context: [B, S, D] hidden states, mask: [B, S] bool (False: padding, ignored);
    candidates: [B, k, D]; probs: [B, k] -> [B] int64, the index of the best candidate (first on
    ties, as argmax)."""
    unit = torch.nn.functional.normalize
    cosine = torch.einsum("bkd,bsd->bks", unit(candidates, dim=-1), unit(context, dim=-1))
    penalty = cosine.masked_fill(~mask[:, None, :], float("-inf")).amax(-1)
    return ((1.0 - alpha) * probs - alpha * penalty).argmax(-1)
