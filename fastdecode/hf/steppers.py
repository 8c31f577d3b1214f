"""Model steppers of the generate loop (both return [B, V] float32 logits of each row's last token).

``prefill() -> logits``, ``decode(tokens [B], sequences [B, cur]) -> logits``, ``session()``,
``hidden_states`` (the last forward's, when asked for) and ``cache()`` (HF's cache object at the
end, for ``return_dict_in_generate``).

- :class:`PagedStepper`: the fast path. Each row of a left-padded batch is an independent sequence
  in a paged KV cache; padding never enters the model (one packed batch, explicit positions).
  The cache grows with the tokens (doubling the blocks of every row when the longest is full) so
  that a large ``max_new_tokens`` costs nothing until tokens arrive.
- :class:`CacheStepper`: everything else (right padding and holes in the mask, a cache passed in,
  ``output_hidden_states``, architectures whose attention does not go through
  ``AttentionInterface``...). The model is fed by HF's own ``_prefill`` /
  ``prepare_inputs_for_generation`` / ``_update_model_kwargs_for_generation`` with its own cache
  and masks, exactly as ``model.generate`` feeds it; only the loop and the sampling are ours.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
from transformers.cache_utils import EncoderDecoderCache

from fastdecode.hf import compat
from fastdecode.hf.graphs import no_writes
from fastdecode.hf.prepare import Prepared
from fastdecode.hf.runner import PagedRunner
from fastdecode.hf.seq2seq import paged_runner, write_rows


class PagedStepper:
    """Runs the B rows of ``prepared`` over a growing paged cache (only their real tokens: the
    masked ones, which no later query attends to, never enter the model; the caller checked that
    positions and attention then follow HF's, see ``fastdecode.hf.generate``).

    max_new_tokens bounds the growth; block_size P: tokens per block. Each step is one
    :class:`~fastdecode.plan.StepPlan` built on the host from the rows' KV lengths and
    positions (kept on the host: no device read per step) and the tokens drawn last step
    (on the device).
    """

    def __init__(self, model, prepared: Prepared, max_new_tokens: int, *, block_size: int = 16,
                 backend: str = "auto"):
        self.prepared = prepared
        self.block_size = block_size
        self.lens = prepared.mask.sum(-1).tolist()  # the one host read of the prompt layout
        self.batch = len(self.lens)
        longest = max(self.lens)
        self.max_blocks = -(-(longest + max_new_tokens) // block_size)
        # Room for the prompt and one more block; doubled whenever the longest row fills it.
        self.blocks_per_row = min(self.max_blocks, -(-longest // block_size) + 1)
        self.runner = paged_runner(model, prepared, num_blocks=self.batch * self.blocks_per_row,
                                   block_size=block_size, backend=backend)
        self.planner = self.runner.planner()
        self.device = self.runner.device
        self.session = self.runner.session
        self.hidden_states = None
        self._kv = np.array(self.lens, dtype=np.int64)  # KV length of each row (host)
        self._longest = longest  # of self._kv
        self._ones = np.ones(self.batch, np.int64)  # new tokens per row in a decode step
        m = self.blocks_per_row
        self._tables = np.arange(self.batch * m, dtype=np.int32).reshape(self.batch, m)

    def prefill(self) -> torch.Tensor:
        """The prompt's tokens (mask == 1) packed row after row, at HF's position ids."""
        p, kwargs = self.prepared, self.prepared.model_kwargs
        keep = p.mask.bool()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = p.mask.cumsum(-1) - 1
        types = kwargs.get("token_type_ids")
        embeds = kwargs.get("inputs_embeds")
        dev = self.device

        def packed(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:  # [B, S, ...] -> [T, ...]
            return None if t is None else t[keep].to(dev)

        plan = self.planner.build(self.lens, self.lens, self._tables,
                                  input_ids=packed(p.input_ids) if embeds is None else None,
                                  positions=packed(positions))
        logits = self.runner.forward(plan.input_ids, plan.positions, plan,
                                     inputs_embeds=packed(embeds), token_type_ids=packed(types))
        masked_tail(self.runner, self.planner, p, self._tables, self.lens, logits)
        # Position ids continue from HF's last column (read once); the KV index of the next
        # token is the row's token count.
        self._pos = np.asarray(positions[:, -1].tolist(), dtype=np.int64) + 1
        self._types = None if types is None else types[:, -1].to(dev)
        return logits

    def decode(self, tokens: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """tokens: [B] int64, one new token per row -> [B, V] float32."""
        if self._longest >= self.blocks_per_row * self.block_size:
            self._grow()
        self._kv += 1
        self._longest += 1
        plan = self.planner.build(self._ones, self._kv, self._tables,
                                  input_ids=tokens.to(self.device, non_blocking=True),
                                  positions=self._pos)
        self._pos += 1
        return self.runner.forward(plan.input_ids, plan.positions, plan,
                                   token_type_ids=self._types)

    def extend(self, tokens: torch.Tensor, counts: list[int], *,
               every_logit: bool = False) -> torch.Tensor:
        """Several new tokens per row in one packed forward (draft verification, draft catch-up).

        tokens: [T] int64, row after row; counts: [B] new tokens of each row (each >= 1, T =
        sum). Returns [T, V] float32, the logits after every token (every_logit), else [B, V] the
        logits after each row's last token.
        """
        steps = np.asarray(counts, dtype=np.int64)
        lens = self._kv + steps
        while int(lens.max()) > self.blocks_per_row * self.block_size:
            if self.blocks_per_row == self.max_blocks:
                raise ValueError(f"a row would hold {int(lens.max())} tokens, more than the "
                                 "prompt and max_new_tokens leave room for")
            self._grow()
        starts = np.repeat(np.cumsum(steps) - steps, steps)  # each token's row start
        positions = np.repeat(self._pos, steps) + np.arange(int(steps.sum())) - starts
        plan = self.planner.build(steps, lens, self._tables,
                                  input_ids=tokens.to(self.device, non_blocking=True),
                                  positions=positions)
        if every_logit:
            plan = dataclasses.replace(plan, logits_indices=None)
        types = (None if self._types is None else
                 self._types.repeat_interleave(torch.from_numpy(steps).to(self.device)))
        logits = self.runner.forward(plan.input_ids, plan.positions, plan, token_type_ids=types)
        self._kv = lens
        self._pos = self._pos + steps
        self._longest = int(lens.max())
        return logits

    def rewind(self, counts: torch.Tensor) -> None:
        """Forget the last ``counts[b]`` tokens of row b ([B] int64): rejected draft tokens. Their
        cache slots are simply overwritten by the row's next tokens."""
        back = np.asarray(counts.tolist(), dtype=np.int64)
        self._kv = self._kv - back
        self._pos = self._pos - back
        self._longest = int(self._kv.max())

    def _grow(self) -> None:
        """Double the blocks of every row (capped at what max_new_tokens can use)."""
        old, new = self.blocks_per_row, min(2 * self.blocks_per_row, self.max_blocks)
        first = self.runner.num_blocks
        self.runner.grow(first + self.batch * (new - old))
        extra = first + np.arange(self.batch * (new - old), dtype=np.int32).reshape(
            self.batch, new - old)
        self._tables = np.concatenate([self._tables, extra], axis=1)
        self.blocks_per_row = new

    def cache(self):
        """HF's cache object of this call, filled from the paged blocks in HF's layout: [B, Hkv,
        columns, D] per layer, the prompt's masked columns zero (they stay masked)."""
        cache = self.prepared.model_kwargs.get(compat.cache_name())
        if cache is None:
            return None
        mask = self.prepared.mask
        width = mask.shape[1] + int(self._kv[0]) - self.lens[0]
        return fill_hf_cache(cache, self.runner, torch.from_numpy(self._tables).to(self.device),
                             torch.from_numpy(self._kv), mask, width)


def fill_hf_cache(cache, runner: PagedRunner, tables: torch.Tensor, kv_lens: torch.Tensor,
                  mask: torch.Tensor, width: int):
    """Writes the paged rows into HF's ``cache`` (empty) as ``[R, Hkv, width, D]`` per layer, in
    HF's columns: the prompt's real tokens where its mask has ones, zeros where it has zeros (HF
    keeps the masked tokens there, masked), then the generated tokens; returns ``cache``. An
    encoder-decoder cache gets the decoder's rows in its self-attention part and the encoder's
    keys / values from the runner in its cross-attention part.

    tables: [R, M] int32 block tables; kv_lens: [R] int64 tokens cached per row (<= width);
    mask: [R, L] the prompt's mask (L <= width).
    """
    device = tables.device
    mask = mask.to(device)
    real = mask.sum(-1, keepdim=True)
    generated = real + torch.arange(width - mask.shape[1], device=device)[None, :]
    index = torch.cat([(mask.cumsum(-1) - 1).masked_fill(mask == 0, -1), generated], dim=1)
    index = index.masked_fill(index >= kv_lens.to(device)[:, None], -1)  # KV index per column
    if isinstance(cache, EncoderDecoderCache):
        runner.fill_cross_cache(cache)
        write_rows(cache.self_attention_cache, runner.k_caches, runner.v_caches, tables, index)
    else:
        write_rows(cache, runner.k_caches, runner.v_caches, tables, index)
    return cache


def masked_tail(runner: PagedRunner, planner, prepared: Prepared, tables, lens: list[int],
                logits: torch.Tensor, stride: int = 1) -> None:
    """HF's prompt logits of the rows whose last mask column is 0 (right padding, a hole at the
    end) into ``logits`` [R, V] (R = B / stride rows of ``prepared``, one per ``stride``).

    ``model.generate`` takes the next token's logits at the last column whatever the mask: that
    column's query attends to the row's real tokens (its own key is masked). Over the paged
    prompt (``tables``: R block tables, ``lens``: R real-token counts) that is a query at HF's
    position which reads the cached keys and writes none.
    """
    rows = (prepared.mask[::stride, -1] == 0).nonzero().flatten().tolist()
    if not rows:
        return
    kwargs = prepared.model_kwargs

    def last(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:  # [B, S, ...] -> [r, ...]
        return None if t is None else t[::stride][rows, -1].to(runner.device)

    embeds = kwargs.get("inputs_embeds")
    plan = planner.build([1] * len(rows), [lens[r] for r in rows], [tables[r] for r in rows],
                         input_ids=last(prepared.input_ids) if embeds is None else None,
                         positions=last(kwargs["position_ids"]), stage_more=no_writes)
    logits[rows] = runner.forward(plan.input_ids, plan.positions, plan,
                                  inputs_embeds=last(embeds),
                                  token_type_ids=last(kwargs.get("token_type_ids")))


class CacheStepper:
    """The model's own forward, cache and masks, fed exactly like ``model.generate`` feeds them.

    forward: what runs the decode steps (``model.generate`` passes its compiled forward when the
    call compiles); the model itself by default. The prefill always runs the model eagerly, as
    HF's does.
    """

    def __init__(self, model, prepared: Prepared, forward=None):
        self.model = model
        self.forward = model if forward is None else forward
        self.prepared = prepared
        self.kwargs = prepared.model_kwargs
        self.hidden_states = None
        optimize = getattr(model, "_optimize_model_for_decode", None)
        self.session = optimize if optimize is not None else nullcontext

    def _take(self, outputs) -> torch.Tensor:
        self.kwargs = self.model._update_model_kwargs_for_generation(
            outputs, self.kwargs, is_encoder_decoder=False)
        self.hidden_states = getattr(outputs, "hidden_states", None)
        return outputs.logits[:, -1].to(copy=True, dtype=torch.float32)

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        p = self.prepared
        return self._take(self.model._prefill(p.input_ids, p.config, self.kwargs))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        inputs = self.model.prepare_inputs_for_generation(
            sequences, next_sequence_length=1 if self.kwargs["use_cache"] else None,
            **self.kwargs)
        return self._take(self.forward(**inputs, return_dict=True))

    def cache(self) -> Optional[object]:
        return self.kwargs.get(compat.cache_name())

