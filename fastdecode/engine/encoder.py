"""Encoder-decoder models (T5 / Flan-T5, BART, Marian) in the Engine.

A request's prompt is the encoder's input; its decoder starts from the model's decoder start
token (HF's choice: the generation config's ``decoder_start_token_id``, else its
``bos_token_id``). The encoder's keys and values live in the decoder's own block pool: per layer
one ``[N, P, Hkv, D]`` tensor holds a request's self-attention blocks (``block_table``, growing)
and its cross-attention blocks (``cross_table``, fixed, read-only), so one block manager counts
both in admission and preemption. The step that admits a request (again after a preemption)
runs the encoder over it, batched with the step's other new requests, and the decoder's forward
pass of that step writes the projected keys and values into its cross blocks (each layer's own
projections, before that layer's cross-attention reads them; see
:class:`fastdecode.hf.seq2seq.Seq2SeqDecoder`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastdecode.engine.model_runner import ModelRunner, StepInputs
from fastdecode.engine.scheduler import ScheduledBatch
from fastdecode.engine.sequence import Sequence
from fastdecode.hf.seq2seq import Seq2SeqDecoder, decoder_geometry
from fastdecode.plan.step import AttentionMeta


@dataclass
class EncoderStep:
    """A step's cross-attention. attn: its metadata (block_tables: [B, M] int32, each entry's
    cross blocks; seq_lens: [B] int32 encoder lengths; slot_mapping: [E] int64 slots of the
    encoder tokens written this step, or None); ids: the encoder ids of the requests encoded
    this step, in batch order (their E tokens, packed)."""

    attn: AttentionMeta
    ids: list[list[int]]


def decoder_start(model) -> list[int]:
    """The decoder's first token, as ``model.generate`` picks it; a ValueError when the model
    names none."""
    for config in (getattr(model, "generation_config", None), model.config):
        for name in ("decoder_start_token_id", "bos_token_id"):
            start = getattr(config, name, None)
            if isinstance(start, int):
                return [start]
    raise ValueError(f"{type(model).__name__}: neither the generation config nor the config "
                     "sets decoder_start_token_id (or bos_token_id): the Engine cannot start "
                     "the decoder")


class EncoderDecoderRunner(ModelRunner):
    """:class:`~fastdecode.engine.model_runner.ModelRunner` for encoder-decoder models."""

    def __init__(self, model, **kwargs) -> None:
        self.decoder_start = decoder_start(model)
        super().__init__(model, **kwargs)
        self._encoder = model.get_encoder()
        param = next(model.parameters())
        # The cross-attention's input in steps that encode nothing (never projected into the
        # cache: their plans write no slot).
        self._placeholder = torch.zeros(1, 1, model.config.get_text_config().hidden_size,
                                        dtype=param.dtype, device=self.device)

    @staticmethod
    def _kv_shape(model) -> tuple[int, int, int]:
        geometry = decoder_geometry(model)
        return geometry["num_layers"], geometry["num_kv_heads"], geometry["head_dim"]

    @staticmethod
    def _paged_runner(model, **kwargs) -> Seq2SeqDecoder:
        return Seq2SeqDecoder(model, **kwargs)

    def attach_draft(self, model) -> None:
        raise ValueError("draft_model is not supported with encoder-decoder models")

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        step = super().prepare(batch)
        step.encoder = self._cross(batch.seqs, step.plan.attn)
        return step

    def _cross(self, seqs: list[Sequence], attn: AttentionMeta) -> EncoderStep:
        """The cross-attention of the step's entries, read from the requests now (under the
        Engine's lock, like the rest of ``prepare``)."""
        size = self.block_size
        width = max(len(s.cross_table) for s in seqs)
        # Columns past a table's end are never read (seq_lens stops before them).
        tables = [s.cross_table + [0] * (width - len(s.cross_table)) for s in seqs]
        lens = [len(s.encoder_ids) for s in seqs]
        new = [s for s in seqs if not s.encoded]
        slots = [s.cross_table[i // size] * size + i % size
                 for s in new for i in range(len(s.encoder_ids))]
        meta = AttentionMeta(
            block_tables=torch.tensor(tables, dtype=torch.int32).to(self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(self.device),
            cu_seqlens_q=attn.cu_seqlens_q,
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(self.device) if new else None,
            decode_only=attn.decode_only, causal=False,
            workspace=self.paged.kv.workspace(len(seqs), width) if attn.decode_only else None)
        return EncoderStep(meta, [list(s.encoder_ids) for s in new])

    def _forward(self, step: StepInputs) -> torch.Tensor:
        cross: EncoderStep = step.encoder
        plan = step.plan
        states = self._encode(cross.ids) if cross.ids else self._placeholder
        return self.paged.step(plan.input_ids, plan.positions, plan,
                               replace(plan, attn=cross.attn), self.paged.kv, states)

    def _encode(self, ids: list[list[int]]) -> torch.Tensor:
        """The encoder over requests of any lengths, in one padded batch -> [1, E, d_model]:
        their last hidden states packed (padding dropped)."""
        width = max(map(len, ids))
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        states = self._encoder(input_ids=input_ids.to(self.device),
                               attention_mask=mask.to(self.device)).last_hidden_state
        return states[mask.to(self.device).bool()][None]
