"""Encoder-decoder models (T5 / Flan-T5, BART, Marian) on paged caches.

The encoder runs once, with the model's own code (``generate``'s preparation runs it). The
decoder runs on packed steps like a decoder-only model, with two paged caches per layer:

- self-attention: a growing paged cache, causal, appended every step (T5's bucketed relative
  position bias goes to the op as ``relative_bias``: a [Hq, 2R + 1] table, R =
  ``relative_attention_max_distance``, beyond which T5's buckets saturate);
- cross-attention: the encoder's keys / values, projected by the layer's own weights once per
  prompt (the first step feeds the packed encoder states, every later step one zero row
  [1, 1, d_model], whose projections are never read: some models cannot reshape an empty
  one), in read-only blocks shared by every row of the prompt, read with ``causal=False``.
  Encoder padding never enters the cache.

The decoder layers call :mod:`fastdecode.hf.seq2seq_attention`. Decoders with learned or
sinusoidal positions (BART, Marian) get the packed steps' positions through a pre-hook on their
``embed_positions`` (their decoders compute positions from a cache length otherwise).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Optional

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from fastdecode import models
from fastdecode.hf.runner import PagedRunner, _configs
from fastdecode.plan import PagedKVCache, StepPlan
from fastdecode.hf.seq2seq_attention import ATTN_NAME, Seq2SeqPlan
from fastdecode.plan.step import AttentionMeta

def _attention_modules(model) -> tuple[list, list]:
    """(self-attention, cross-attention) modules of the decoder, in layer order."""
    decoder = model.get_decoder()
    found = [m for m in decoder.modules()
             if isinstance(getattr(m, "is_causal", None), bool) and hasattr(m, "layer_idx")
             and hasattr(m, "config")]
    return [m for m in found if m.is_causal], [m for m in found if not m.is_causal]


def unsupported_reason(model) -> Optional[str]:
    """Why :class:`Seq2SeqRunner` cannot run ``model`` exactly (None: it can)."""
    name = type(model).__name__
    if not getattr(model.config, "is_encoder_decoder", False) or not hasattr(model,
                                                                             "get_decoder"):
        return f"{name} is not an encoder-decoder model"
    params = inspect.signature(model.forward).parameters
    if not {"encoder_outputs", "decoder_input_ids", "use_cache"} <= set(params):
        return f"{name}.forward without encoder_outputs / decoder_input_ids"
    selfs, crosses = _attention_modules(model)
    if not selfs or len(selfs) != len(crosses):
        return f"{name}: a decoder layout (self- and cross-attention per layer) not recognised"
    if sum(bool(getattr(m, "has_relative_attention_bias", False)) for m in selfs) > 1:
        return f"{name}: a relative position bias per layer"
    embed = getattr(model.get_decoder(), "embed_positions", None)
    if embed is not None and "position_ids" not in inspect.signature(embed.forward).parameters:
        return f"{name}: decoder positions that cannot be given explicitly"
    return None


def _relative_bias(module) -> torch.Tensor:
    """T5's decoder bias per distance j - i in -R .. R -> [Hq, 2R + 1] float32 (R: the max
    distance, from which the causal buckets saturate; positive distances are masked)."""
    radius = module.relative_attention_max_distance
    distance = torch.arange(-radius, radius + 1, device=module.relative_attention_bias.weight.device)
    buckets = module._relative_position_bucket(
        distance, bidirectional=False, num_buckets=module.relative_attention_num_buckets,
        max_distance=radius)
    return module.relative_attention_bias(buckets).t().float().contiguous()


class Seq2SeqRunner(PagedRunner):
    """The decoder of an encoder-decoder model on packed steps over paged caches.

    Same interface as :class:`~fastdecode.hf.runner.PagedRunner` for the decoder's cache (
    ``kv``, ``k_caches``, ``planner()``, ``forward``, ``session()``, ``grow``); ``cross_kv`` holds
    the encoder's keys / values.

    encoder_states: [R, S, d_model], the encoder's last hidden state of each row;
    encoder_mask: [R, S] (1 = token) or None; rows_per_prompt: consecutive rows of one prompt
    (num_beams / num_return_sequences): their encoder keys are computed and stored once.
    A step's rows map to prompts evenly (a step of one row per prompt, or of every row).
    fast_linears, native: as for :class:`~fastdecode.hf.runner.PagedRunner` (the native step
    is :class:`fastdecode.models.Seq2SeqStep`).
    """

    attn_name = ATTN_NAME

    def __init__(self, model, *, encoder_states: torch.Tensor,
                 encoder_mask: Optional[torch.Tensor], rows_per_prompt: int, num_blocks: int,
                 block_size: int = 16, kv_dtype: Optional[torch.dtype] = None, device=None,
                 backend: str = "auto", fast_linears: Optional[bool] = None,
                 native: Optional[bool] = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        selfs, _ = _attention_modules(model)
        heads = getattr(selfs[0], "n_heads", None) or selfs[0].num_heads
        head_dim = getattr(selfs[0], "key_value_proj_dim", None) or selfs[0].head_dim
        geometry = dict(num_layers=len(selfs), num_kv_heads=heads, head_dim=head_dim,
                        num_qo_heads=heads)
        self._setup(model, _configs(model.get_decoder()), geometry, num_blocks=num_blocks,
                    block_size=block_size, kv_dtype=kv_dtype, device=device, backend=backend,
                    fast_linears=fast_linears, native=native)
        biased = [m for m in selfs if getattr(m, "has_relative_attention_bias", False)]
        with torch.no_grad():
            self.relative_bias = _relative_bias(biased[0]).to(self.device) if biased else None

        states = encoder_states[::rows_per_prompt]
        keep = (torch.ones(states.shape[:2], dtype=torch.bool) if encoder_mask is None
                else encoder_mask[::rows_per_prompt].bool().cpu())
        self._rows_per_prompt = rows_per_prompt
        self._encoder_mask = (torch.ones(encoder_states.shape[:2], dtype=torch.long)
                              if encoder_mask is None else encoder_mask.cpu())
        lens = keep.sum(-1).numpy().astype(np.int64)
        blocks = -(-lens // block_size)
        self.encoder_lens = lens.tolist()
        self.cross_kv = PagedKVCache(num_blocks=max(int(blocks.sum()), 1), block_size=block_size,
                                     dtype=self.kv_dtype, device=self.device, backend=backend,
                                     **geometry)
        width = max(int(blocks.max()), 1)
        starts = np.cumsum(blocks) - blocks
        tables = starts[:, None] + np.arange(width)[None, :]
        self._cross_tables = torch.from_numpy(tables.astype(np.int32)).to(self.device)
        self._cross_lens = torch.from_numpy(lens.astype(np.int32)).to(self.device)
        slots = np.concatenate([s * block_size + np.arange(n) for s, n in zip(starts, lens)])
        self._cross_slots: Optional[torch.Tensor] = torch.from_numpy(slots).to(self.device)
        self._pending: Optional[torch.Tensor] = states[keep.to(states.device)][None].to(
            self.device)  # [1, sum(lens), d]: written by the first step
        self._placeholder = states.new_zeros(1, 1, states.shape[-1]).to(self.device)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._embed = getattr(model.get_decoder(), "embed_positions", None)
        self._positions: Optional[torch.Tensor] = None

    @contextmanager
    def session(self) -> Iterator[None]:
        """:meth:`PagedRunner.session` with the decoder's positions taken from the steps."""
        if self._active or self._embed is None:
            with super().session():
                yield
            return
        hook = self._embed.register_forward_pre_hook(self._give_positions, with_kwargs=True)
        try:
            with super().session():
                yield
        finally:
            hook.remove()

    def _give_positions(self, module, args, kwargs):
        return args, {**kwargs, "position_ids": self._positions}

    def _encoder_plan(self, plan: StepPlan) -> StepPlan:
        """The cross-attention plan of ``plan``'s tokens: each row reads its prompt's blocks."""
        rows = plan.num_seqs
        if rows not in self._rows:
            prompts = len(self.encoder_lens)
            if rows % prompts:
                raise ValueError(f"a step of {rows} rows for {prompts} prompts")
            index = torch.arange(rows, device=self.device) // (rows // prompts)
            self._rows[rows] = (self._cross_tables[index].contiguous(),
                                self._cross_lens[index].contiguous())
        tables, lens = self._rows[rows]
        decode = plan.attn.decode_only
        meta = AttentionMeta(
            block_tables=tables, seq_lens=lens, cu_seqlens_q=plan.attn.cu_seqlens_q,
            slot_mapping=self._cross_slots, decode_only=decode, causal=False,
            workspace=self.cross_kv.workspace(rows, tables.shape[1]) if decode else None)
        return replace(plan, attn=meta)

    def fill_cross_cache(self, cache) -> None:
        """Writes the encoder's keys / values into ``cache.cross_attention_cache`` (HF's
        ``EncoderDecoderCache``, empty) as ``[R, Hkv, S, D]`` per layer, at the encoder mask's
        columns (padding columns zero: HF's hold keys of the padding states, which the mask
        hides), and marks every layer's cross-attention as computed."""
        mask = self._encoder_mask
        rows = torch.arange(mask.shape[0]) // self._rows_per_prompt
        index = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, -1).to(self.device)
        write_rows(cache.cross_attention_cache, self.cross_kv.k_caches, self.cross_kv.v_caches,
                   self._cross_tables[rows.to(self.device)], index)
        for layer in range(self.num_layers):
            cache.is_updated[layer] = True

    @torch.no_grad()
    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                plan: StepPlan, *, inputs_embeds: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, positions: [T] int64 (decoder tokens) -> [S, V] float32 logits at
        ``plan.logits_indices`` (every row when None). The first call also writes the encoder's
        keys / values."""
        if token_type_ids is not None:
            raise ValueError("encoder-decoder models take no token_type_ids")
        step = Seq2SeqPlan(plan, self._encoder_plan(plan), self.relative_bias)
        if (self.native is not None and inputs_embeds is None
                and not models.hooked(self.model)):
            pending = None if self._pending is None else self._pending[0]
            logits = self.native(input_ids, positions, step, self.kv, self.cross_kv, pending)
            self._pending, self._cross_slots = None, None
            return logits
        states = self._pending if self._pending is not None else self._placeholder
        calls = self.kv.calls + self.cross_kv.calls
        extra = ({"decoder_inputs_embeds": inputs_embeds[None]} if inputs_embeds is not None
                 else {"decoder_input_ids": input_ids[None]})
        with self.session():
            self._positions = positions
            try:
                out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                                 use_cache=False, fastdecode_plan=step,
                                 fastdecode_kv=(self.kv, self.cross_kv), **extra)
            finally:
                self._positions = None
        self._pending, self._cross_slots = None, None  # the encoder blocks are read-only now
        if not self._verified:
            calls = self.kv.calls + self.cross_kv.calls - calls
            if calls != 2 * self.num_layers:
                raise RuntimeError(
                    f"{type(self.model).__name__}: {calls} attention calls reached the paged "
                    f"kernels for {self.num_layers} decoder layers (self and cross)")
            self._verified = True
        logits = out.logits[0]
        if plan.logits_indices is not None:
            logits = logits[plan.logits_indices]
        return logits.float()



def write_rows(cache, k_pools: list, v_pools: list, tables: torch.Tensor,
               index: torch.Tensor) -> None:
    """Appends ``[R, Hkv, W, D]`` per layer to HF's ``cache`` (a ``DynamicCache``, empty),
    gathered from paged pools ([N, P, Hkv, D] per layer).

    tables: [R, M] int32 block tables; index: [R, W] int64 KV index of each column (negative:
    a zero column).
    """
    valid = index >= 0
    index = index.clamp(min=0)
    size = k_pools[0].shape[1]
    slots = tables.long().gather(1, index // size) * size + index % size  # [R, W]
    for layer, (k, v) in enumerate(zip(k_pools, v_pools)):
        keys, values = (c.flatten(0, 1)[slots] * valid[..., None, None] for c in (k, v))
        cache.update(keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous(),
                     layer)


def paged_runner(model, prepared, **kwargs):
    """The runner of a prepared ``generate`` call: a :class:`Seq2SeqRunner` over the encoder's
    outputs in ``prepared.model_kwargs`` for encoder-decoder models, else a
    :class:`~fastdecode.hf.runner.PagedRunner`. kwargs: num_blocks, block_size, backend."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return PagedRunner(model, **kwargs)
    config, model_kwargs = prepared.config, prepared.model_kwargs
    return Seq2SeqRunner(model, encoder_states=model_kwargs["encoder_outputs"][0],
                         encoder_mask=model_kwargs.get("attention_mask"),
                         rows_per_prompt=max(config.num_beams or 1,
                                             config.num_return_sequences or 1), **kwargs)
