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

:class:`Seq2SeqDecoder` runs one such step over caches and plans its caller gives;
:class:`Seq2SeqRunner` is ``generate``'s (fixed prompts, their encoder blocks in a cache of
their own), :class:`fastdecode.engine.encoder.EncoderDecoderRunner` the Engine's (each
request's encoder blocks in the decoder's pool). The decoder layers call
:mod:`fastdecode.hf.seq2seq_attention`. Decoders with learned or
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


class Seq2SeqDecoder(PagedRunner):
    """The decoder of an encoder-decoder model on packed steps over paged caches: ``kv`` holds
    the decoder's self-attention cache (same interface as
    :class:`~fastdecode.hf.runner.PagedRunner`); each :meth:`step` names the cache and plan of
    the cross-attention (the encoder's keys / values), which the caller owns.

    num_blocks, block_size, kv_dtype, device, backend, fast_linears, native: as for
    :class:`~fastdecode.hf.runner.PagedRunner` (the native step is
    :class:`fastdecode.models.Seq2SeqStep`). ``geometry``: the caches' shape (num_layers,
    num_kv_heads, head_dim, num_qo_heads), the same for self- and cross-attention.
    """

    attn_name = ATTN_NAME

    def __init__(self, model, *, num_blocks: int, block_size: int = 16,
                 kv_dtype: Optional[torch.dtype] = None, device=None, backend: str = "auto",
                 fast_linears: Optional[bool] = None, native: Optional[bool] = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        self.geometry = decoder_geometry(model)
        self._setup(model, _configs(model.get_decoder()), self.geometry, num_blocks=num_blocks,
                    block_size=block_size, kv_dtype=kv_dtype, device=device, backend=backend,
                    fast_linears=fast_linears, native=native)
        biased = [m for m in _attention_modules(model)[0]
                  if getattr(m, "has_relative_attention_bias", False)]
        with torch.no_grad():
            self.relative_bias = _relative_bias(biased[0]).to(self.device) if biased else None
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

    @torch.no_grad()
    def step(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, plan: StepPlan,
             cross_plan: StepPlan, cross_kv: PagedKVCache, encoder_states: torch.Tensor, *,
             inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decoder step -> [S, V] float32 logits at ``plan.logits_indices`` (every row when
        None).

        input_ids, positions: [T] int64 decoder tokens (or inputs_embeds [T, d_model]); plan:
        the self-attention over ``kv``; cross_plan: the same tokens' cross-attention over
        ``cross_kv`` (which may be ``kv`` itself: one pool, other blocks); encoder_states:
        [1, E, d_model], the packed encoder states whose keys / values ``cross_plan`` writes
        (its slot_mapping: [E] slots), or one placeholder row when it writes none (some models
        cannot project an empty one).
        """
        step = Seq2SeqPlan(plan, cross_plan, self.relative_bias)
        if self.native is not None and inputs_embeds is None and not models.hooked(self.model):
            pending = encoder_states[0] if cross_plan.attn.slot_mapping is not None else None
            return self.native(input_ids, positions, step, self.kv, cross_kv, pending)
        caches = [self.kv] if cross_kv is self.kv else [self.kv, cross_kv]
        calls = sum(c.calls for c in caches)
        extra = ({"decoder_inputs_embeds": inputs_embeds[None]} if inputs_embeds is not None
                 else {"decoder_input_ids": input_ids[None]})
        with self.session():
            self._positions = positions
            try:
                out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                                 use_cache=False, fastdecode_plan=step,
                                 fastdecode_kv=(self.kv, cross_kv), **extra)
            finally:
                self._positions = None
        if not self._verified:
            calls = sum(c.calls for c in caches) - calls
            if calls != 2 * self.num_layers:
                raise RuntimeError(
                    f"{type(self.model).__name__}: {calls} attention calls reached the paged "
                    f"kernels for {self.num_layers} decoder layers (self and cross)")
            self._verified = True
        logits = out.logits[0]
        if plan.logits_indices is not None:
            logits = logits[plan.logits_indices]
        return logits.float()


def decoder_geometry(model) -> dict:
    """num_layers, num_kv_heads, head_dim, num_qo_heads of the decoder's attention (its self-
    and cross-attention alike)."""
    selfs, _ = _attention_modules(model)
    heads = getattr(selfs[0], "n_heads", None) or selfs[0].num_heads
    head_dim = getattr(selfs[0], "key_value_proj_dim", None) or selfs[0].head_dim
    return dict(num_layers=len(selfs), num_kv_heads=heads, head_dim=head_dim,
                num_qo_heads=heads)


class Seq2SeqRunner(Seq2SeqDecoder):
    """The decoder of one ``generate`` call: fixed prompts, their encoder keys / values in a
    cache of their own (``cross_kv``).

    Same interface as :class:`~fastdecode.hf.runner.PagedRunner` for the decoder's cache (
    ``kv``, ``k_caches``, ``planner()``, ``forward``, ``session()``, ``grow``).

    encoder_states: [R, S, d_model], the encoder's last hidden state of each row;
    encoder_mask: [R, S] (1 = token) or None; rows_per_prompt: consecutive rows of one prompt
    (num_beams / num_return_sequences): their encoder keys are computed and stored once.
    A step's rows map to prompts evenly (a step of one row per prompt, or of every row).
    fast_linears: as for :class:`~fastdecode.hf.runner.PagedRunner`.
    """

    def __init__(self, model, *, encoder_states: torch.Tensor,
                 encoder_mask: Optional[torch.Tensor], rows_per_prompt: int, num_blocks: int,
                 block_size: int = 16, kv_dtype: Optional[torch.dtype] = None, device=None,
                 backend: str = "auto", fast_linears: Optional[bool] = None,
                 native: Optional[bool] = None):
        super().__init__(model, num_blocks=num_blocks, block_size=block_size, kv_dtype=kv_dtype,
                         device=device, backend=backend, fast_linears=fast_linears, native=native)
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
                                     **self.geometry)
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

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                plan: StepPlan, *, inputs_embeds: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, positions: [T] int64 (decoder tokens) -> [S, V] float32 logits at
        ``plan.logits_indices`` (every row when None). The first call also writes the encoder's
        keys / values."""
        if token_type_ids is not None:
            raise ValueError("encoder-decoder models take no token_type_ids")
        states = self._pending if self._pending is not None else self._placeholder
        logits = self.step(input_ids, positions, plan, self._encoder_plan(plan), self.cross_kv,
                           states, inputs_embeds=inputs_embeds)
        self._pending, self._cross_slots = None, None  # the encoder blocks are read-only now
        return logits


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
