"""Model steppers for the generate loop: ``prefill(ids, mask) -> logits``, ``decode(tokens) -> logits``.

- :class:`PagedStepper`: the fast path. Each row of the left-padded batch is an independent
  sequence in a paged KV cache; padding never enters the model (one packed batch, explicit
  positions ``attention_mask.cumsum(-1) - 1``). Decode steps update preallocated metadata in place.
- :class:`CacheStepper`: the generic path for architectures whose attention does not go through
  ``AttentionInterface`` (Falcon, GPT-J, Bloom, ...) or uses features the paged kernels lack: the
  model keeps its own cache (``DynamicCache``) and its own masks, exactly as in ``model.generate``.

Both return [B, V] float32 logits of each row's last token.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from fastdecode.hf.context import PagedContext
from fastdecode.hf.runner import PagedRunner


class PagedStepper:
    """Runs B left-padded rows over a paged cache sized for ``max_len`` tokens per row."""

    def __init__(self, model, batch: int, max_len: int, *, block_size: int = 16,
                 backend: str = "auto"):
        self.block_size = block_size
        self.blocks_per_seq = -(-max_len // block_size)
        self.runner = PagedRunner(model, num_blocks=batch * self.blocks_per_seq,
                                  block_size=block_size, backend=backend)
        self.backend = backend
        self.device = self.runner.device
        self.session = self.runner.session

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, L] (left padding) -> [B, V] float32."""
        keep = attention_mask.bool()
        lens = keep.sum(-1).tolist()  # the one host read of the prompt layout
        if min(lens) == 0:
            raise ValueError("every row of attention_mask needs at least one token")
        batch, m = len(lens), self.blocks_per_seq
        tables = [list(range(b * m, (b + 1) * m)) for b in range(batch)]
        ctx = PagedContext.build(tables, lens, lens, self.block_size, self.device, self.backend)
        positions = (keep.long().cumsum(-1) - 1)[keep]
        logits = self.runner.forward(input_ids[keep], positions, ctx)
        # Decode-step state, updated in place: next position (= KV index) of each row.
        dev = self.device
        self._pos = torch.tensor(lens, dtype=torch.int64, device=dev)
        self._base = torch.arange(batch, dtype=torch.int64, device=dev) * (m * self.block_size)
        rows = torch.arange(batch, dtype=torch.int32, device=dev)
        self._ctx = PagedContext(
            block_tables=ctx.block_tables, seq_lens=torch.empty_like(ctx.seq_lens),
            cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=dev),
            slot_mapping=torch.empty(batch, dtype=torch.int64, device=dev), decode_only=True,
            logits_indices=rows.long(), backend=self.backend)
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] int64, one new token per row -> [B, V] float32."""
        ctx = self._ctx
        torch.add(self._base, self._pos, out=ctx.slot_mapping)
        ctx.seq_lens.copy_(self._pos + 1)
        logits = self.runner.forward(tokens, self._pos, ctx)
        self._pos += 1
        return logits


class CacheStepper:
    """The model's own forward and cache, fed like ``model.generate`` feeds it."""

    def __init__(self, model):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._positions = "position_ids" in params
        self._keep = "logits_to_keep" in params
        self.session = nullcontext

    def _forward(self, ids, **kwargs) -> torch.Tensor:
        if self._positions:
            kwargs["position_ids"] = self._position_ids
        if self._keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=self._mask, use_cache=True, **kwargs)
        self._cache = out.past_key_values
        return out.logits[:, -1].float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._mask = attention_mask
        positions = attention_mask.long().cumsum(-1) - 1
        self._position_ids = positions.masked_fill(attention_mask == 0, 0)
        return self._forward(input_ids)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], -1)
        self._position_ids = self._position_ids[:, -1:] + 1
        return self._forward(tokens[:, None], past_key_values=self._cache)
