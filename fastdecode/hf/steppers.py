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

from contextlib import nullcontext
from typing import Optional

import torch

from fastdecode.hf import compat
from fastdecode.hf.context import PagedContext
from fastdecode.hf.prepare import Prepared
from fastdecode.hf.runner import PagedRunner


class PagedStepper:
    """Runs the B rows of ``prepared`` (left padding only) over a growing paged cache.

    max_new_tokens bounds the growth; block_size P: tokens per block.
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
        self.runner = PagedRunner(model, num_blocks=self.batch * self.blocks_per_row,
                                  block_size=block_size, backend=backend)
        self.backend = backend
        self.device = self.runner.device
        self.session = self.runner.session
        self.hidden_states = None
        self._longest_kv = longest  # KV index the longest row writes next (host copy)
        m = self.blocks_per_row
        self._tables = torch.arange(self.batch * m, dtype=torch.int32,
                                    device=self.device).view(self.batch, m)

    def prefill(self) -> torch.Tensor:
        """The prompt's tokens (mask == 1) packed row after row, at HF's position ids."""
        p, kwargs = self.prepared, self.prepared.model_kwargs
        keep = p.mask.bool()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = p.mask.cumsum(-1) - 1
        types = kwargs.get("token_type_ids")
        embeds = kwargs.get("inputs_embeds")
        m = self.blocks_per_row
        tables = [list(range(b * m, (b + 1) * m)) for b in range(self.batch)]
        ctx = PagedContext.build(tables, self.lens, self.lens, self.block_size, self.device,
                                 self.backend)
        dev = self.device

        def packed(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:  # [B, S, ...] -> [T, ...]
            return None if t is None else t[keep].to(dev)

        logits = self.runner.forward(
            packed(p.input_ids) if embeds is None else None, packed(positions), ctx,
            inputs_embeds=packed(embeds), token_type_ids=packed(types))
        # Decode-step state, updated in place. Position ids continue from HF's last column; the
        # KV index of the next token is the row's token count.
        self._pos = positions[:, -1].to(dev) + 1
        self._kv = torch.tensor(self.lens, dtype=torch.int64, device=dev)
        self._types = None if types is None else types[:, -1].to(dev)
        self._ctx = PagedContext(
            block_tables=self._tables, seq_lens=torch.empty_like(ctx.seq_lens),
            cu_seqlens_q=torch.arange(self.batch + 1, dtype=torch.int32, device=dev),
            slot_mapping=torch.empty(self.batch, dtype=torch.int64, device=dev), decode_only=True,
            logits_indices=torch.arange(self.batch, dtype=torch.int64, device=dev),
            backend=self.backend)
        return logits

    def decode(self, tokens: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """tokens: [B] int64, one new token per row -> [B, V] float32."""
        if self._longest_kv >= self.blocks_per_row * self.block_size:
            self._grow()
        self._longest_kv += 1
        ctx, kv, size = self._ctx, self._kv, self.block_size
        block = self._tables.gather(1, (kv // size)[:, None])[:, 0].long()
        torch.add(block * size, kv % size, out=ctx.slot_mapping)
        ctx.seq_lens.copy_(kv + 1)
        logits = self.runner.forward(tokens.to(self.device, non_blocking=True), self._pos, ctx,
                                     token_type_ids=self._types)
        self._kv += 1
        self._pos += 1
        return logits

    def extend(self, tokens: torch.Tensor, counts: list[int], *,
               every_logit: bool = False) -> torch.Tensor:
        """Several new tokens per row in one packed forward (draft verification, draft catch-up).

        tokens: [T] int64, row after row; counts: [B] new tokens of each row (each >= 1, T =
        sum). Returns [T, V] float32, the logits after every token (every_logit), else [B, V] the
        logits after each row's last token.
        """
        kv = self._kv.tolist()  # a host read: callers sync once per step anyway
        lens = [n + c for n, c in zip(kv, counts)]
        while max(lens) > self.blocks_per_row * self.block_size:
            if self.blocks_per_row == self.max_blocks:
                raise ValueError(f"a row would hold {max(lens)} tokens, more than the prompt and "
                                 "max_new_tokens leave room for")
            self._grow()
        ctx = PagedContext.build(self._tables.tolist(), lens, counts, self.block_size,
                                 self.device, self.backend)
        if every_logit:
            ctx.logits_indices = torch.arange(len(tokens), device=self.device)
        steps = torch.tensor(counts, device=self.device)
        offsets = torch.arange(len(tokens), device=self.device) - (
            ctx.cu_seqlens_q[:-1].long().repeat_interleave(steps))
        types = None if self._types is None else self._types.repeat_interleave(steps)
        logits = self.runner.forward(tokens.to(self.device), self._pos.repeat_interleave(steps)
                                     + offsets, ctx, token_type_ids=types)
        self._kv += steps
        self._pos += steps
        self._longest_kv = max(lens)
        return logits

    def rewind(self, counts: torch.Tensor) -> None:
        """Forget the last ``counts[b]`` tokens of row b ([B] int64): rejected draft tokens. Their
        cache slots are simply overwritten by the row's next tokens."""
        self._kv -= counts.to(self.device)
        self._pos -= counts.to(self.device)
        self._longest_kv = int(self._kv.max())

    def _grow(self) -> None:
        """Double the blocks of every row (capped at what max_new_tokens can use)."""
        old, new = self.blocks_per_row, min(2 * self.blocks_per_row, self.max_blocks)
        first = self.runner.num_blocks
        self.runner.grow(first + self.batch * (new - old))
        extra = first + torch.arange(self.batch * (new - old), dtype=torch.int32,
                                     device=self.device).view(self.batch, new - old)
        self._tables = torch.cat([self._tables, extra], dim=1)
        self._ctx.block_tables = self._tables
        self.blocks_per_row = new

    def cache(self):
        """HF's cache object of this call, filled from the paged blocks in HF's layout: [B, Hkv,
        columns, D] per layer, the prompt's padding columns zero (they stay masked)."""
        cache = self.prepared.model_kwargs.get(compat.cache_name())
        if cache is None:
            return None
        width = self.prepared.mask.shape[1] + int(self._kv[0]) - self.lens[0]
        pad = torch.tensor([width - n for n in self._kv.tolist()], device=self.device)
        index = torch.arange(width, device=self.device)[None, :] - pad[:, None]  # KV index
        valid = index >= 0
        index = index.clamp(min=0)
        size = self.block_size
        slots = self._tables.long().gather(1, index // size) * size + index % size  # [B, W]
        for layer, (k, v) in enumerate(zip(self.runner.k_caches, self.runner.v_caches)):
            keys, values = (c.flatten(0, 1)[slots] * valid[..., None, None] for c in (k, v))
            cache.update(keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous(),
                         layer)
        return cache


class CacheStepper:
    """The model's own forward, cache and masks, fed exactly like ``model.generate`` feeds them."""

    def __init__(self, model, prepared: Prepared):
        self.model = model
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
        return self._take(self.model(**inputs, return_dict=True))

    def cache(self) -> Optional[object]:
        return self.kwargs.get(compat.cache_name())

