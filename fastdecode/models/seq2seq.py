"""Native decoder steps for encoder-decoder models (T5 / Flan-T5, BART, Marian), free of
transformers' module tree.

Per decoder layer, on the packed tokens of a step (T rows): one fused q/k/v product and the
self-attention on the decoder's paged cache (T5: its relative position bias table), the
cross-attention's query product and the attention over the encoder's read-only blocks, the FFN
(T5: ReLU or gated GELU, one fused wi_0/wi_1 product; BART / Marian: fc1, activation, fc2).
T5 normalises before each part (RMSNorm), BART and Marian after each residual (LayerNorm). The
first step also projects the packed encoder states into every layer's cross keys / values
(fused k/v product) and writes them; later steps pass a placeholder the plan never writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastdecode.models.layers import Projection, rms_norm
from fastdecode.plan import PagedKVCache

# Activation names (transformers' ACT2FN keys) -> one fused op. "gelu_new" is the tanh
# approximation that transformers spells out in seven element-wise ops: the fused op computes the
# same formula (within float rounding) at the cost of one. Other names call the model's own.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class _Layer:
    """One decoder layer: norms are (weight, bias or None) pairs; ffn_in holds wi (T5 ReLU),
    wi_0 / wi_1 side by side (T5 gated) or fc1 (BART)."""

    self_norm: tuple
    qkv: Projection
    self_o: Projection
    cross_norm: tuple
    cross_q: Projection
    cross_kv: Projection
    cross_o: Projection
    ffn_norm: tuple
    ffn_in: Projection
    ffn_out: Projection


class Seq2SeqStep:
    """``step(input_ids, positions, plan, kv, cross_kv, encoder_states) -> [S, V] float32``
    logits of ``plan.decoder.logits_indices`` (every row when None), as the HF decoder computes
    them over the same paged caches.

    model: a model :func:`fastdecode.models.support.unsupported_reason` accepts (T5, BART,
    Marian); packed, fuse: how projections hold their weights (see
    :class:`~fastdecode.models.layers.Projection`).
    """

    def __init__(self, model: torch.nn.Module, *, packed: bool, fuse: bool) -> None:
        options = dict(packed=packed, fuse=fuse)
        config, decoder = model.config, model.get_decoder()
        self.t5 = config.model_type == "t5"
        self.embed = decoder.embed_tokens.weight.detach()
        self.head = Projection([model.lm_head], **options)
        bias = getattr(model, "final_logits_bias", None)
        self.logits_bias = None if bias is None else bias.detach()[0]
        if self.t5:
            blocks = decoder.block
            attn = blocks[0].layer[0].SelfAttention
            self.heads, self.head_dim = attn.n_heads, attn.key_value_proj_dim
            self.eps = float(decoder.final_layer_norm.variance_epsilon)
            self.final_norm = (decoder.final_layer_norm.weight.detach(), None)
            self.output_scale = (config.d_model ** -0.5
                                 if getattr(config, "scale_decoder_outputs", False) else None)
            self.act = _ACTIVATIONS.get(config.dense_act_fn,
                                        blocks[0].layer[-1].DenseReluDense.act)
            self.gated = bool(config.is_gated_act)
            self.layers = [self._t5_layer(b, **options) for b in blocks]
        else:
            attn = decoder.layers[0].self_attn
            self.heads, self.head_dim = attn.num_heads, attn.head_dim
            self.eps = float(decoder.layers[0].final_layer_norm.eps)
            self.embed_scale = float(getattr(decoder, "embed_scale", None)
                                     or getattr(decoder.embed_tokens, "embed_scale", 1.0))
            positions = decoder.embed_positions
            self.position_table = positions.weight.detach()
            self.position_offset = int(getattr(positions, "offset", 0))
            norm = getattr(decoder, "layernorm_embedding", None)
            self.embed_norm = None if norm is None else _norm(norm)
            self.act = _ACTIVATIONS.get(config.activation_function,
                                        decoder.layers[0].activation_fn)
            self.layers = [self._bart_layer(layer, **options) for layer in decoder.layers]
        self.scale = float(attn.scaling)

    @staticmethod
    def _t5_layer(block: torch.nn.Module, **options: bool) -> _Layer:
        self_attn, cross, ff = block.layer
        sa, ca, mlp = self_attn.SelfAttention, cross.EncDecAttention, ff.DenseReluDense
        ffn_in = [mlp.wi_0, mlp.wi_1] if hasattr(mlp, "wi_0") else [mlp.wi]
        return _Layer(
            self_norm=_norm(self_attn.layer_norm), qkv=Projection([sa.q, sa.k, sa.v], **options),
            self_o=Projection([sa.o], **options), cross_norm=_norm(cross.layer_norm),
            cross_q=Projection([ca.q], **options), cross_kv=Projection([ca.k, ca.v], **options),
            cross_o=Projection([ca.o], **options), ffn_norm=_norm(ff.layer_norm),
            ffn_in=Projection(ffn_in, **options), ffn_out=Projection([mlp.wo], **options))

    @staticmethod
    def _bart_layer(layer: torch.nn.Module, **options: bool) -> _Layer:
        sa, ca = layer.self_attn, layer.encoder_attn
        return _Layer(
            self_norm=_norm(layer.self_attn_layer_norm),
            qkv=Projection([sa.q_proj, sa.k_proj, sa.v_proj], **options),
            self_o=Projection([sa.out_proj], **options),
            cross_norm=_norm(layer.encoder_attn_layer_norm),
            cross_q=Projection([ca.q_proj], **options),
            cross_kv=Projection([ca.k_proj, ca.v_proj], **options),
            cross_o=Projection([ca.out_proj], **options), ffn_norm=_norm(layer.final_layer_norm),
            ffn_in=Projection([layer.fc1], **options), ffn_out=Projection([layer.fc2], **options))

    def _normed(self, x: torch.Tensor, norm: tuple) -> torch.Tensor:
        """x: [T, d_model] -> T5's RMSNorm or BART's LayerNorm of x."""
        weight, bias = norm
        if self.t5:
            return rms_norm(x, weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)

    def _sublayer(self, h: torch.Tensor, norm: tuple, body: Callable[[torch.Tensor],
                                                                       torch.Tensor],
                  out: Projection) -> torch.Tensor:
        """One residual part: T5 ``h + out(body(norm(h)))``, BART ``norm(h + out(body(h)))``."""
        if self.t5:
            return out.add_to(h, body(self._normed(h, norm)))
        return self._normed(out.add_to(h, body(h)), norm)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed)
        if self.t5:
            return h
        if self.embed_scale != 1.0:
            h = h * self.embed_scale
        h = h + self.position_table[positions + self.position_offset]
        return h if self.embed_norm is None else self._normed(h, self.embed_norm)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, plan,
                 kv: PagedKVCache, cross_kv: PagedKVCache,
                 encoder_states: Optional[torch.Tensor]) -> torch.Tensor:
        """input_ids, positions: [T] int64; plan: a
        :class:`~fastdecode.hf.seq2seq_attention.Seq2SeqPlan`; encoder_states: [S, d_model] (the
        packed encoder states the encoder plan's slots receive: first step) or None ->
        [S, V] float32."""
        with torch.inference_mode():  # no autograd bookkeeping on the many small ops
            h = self._layers(input_ids, positions, plan, kv, cross_kv, encoder_states)
        # The head runs outside: its logits are ordinary tensors that callers may modify in place.
        logits = self.head(h)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        return logits.float()

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, plan,
                kv: PagedKVCache, cross_kv: PagedKVCache,
                encoder_states: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`__call__`'s decoder layers -> [S, d_model]: the LM head's input at the plan's
        ``logits_indices`` rows."""
        hq, d = self.heads, self.head_dim
        h = self._embed(input_ids, positions)
        t = h.shape[0]
        placeholder = h.new_zeros(1, 2 * hq * d)

        def self_attention(x: torch.Tensor) -> torch.Tensor:
            q, k, v = layer.qkv(x).view(t, 3, hq, d).unbind(1)
            return kv.attend(plan.decoder, index, q, k, v, scale=self.scale, softcap=None,
                             sliding_window=None, relative_bias=plan.relative_bias).view(t, -1)

        def cross_attention(x: torch.Tensor) -> torch.Tensor:
            keys = placeholder if encoder_states is None else layer.cross_kv(encoder_states)
            k, v = keys.view(-1, 2, hq, d).unbind(1)
            q = layer.cross_q(x).view(t, hq, d)
            return cross_kv.attend(plan.encoder, index, q, k, v, scale=self.scale,
                                   softcap=None, sliding_window=None).view(t, -1)

        for index, layer in enumerate(self.layers):
            h = self._sublayer(h, layer.self_norm, self_attention, layer.self_o)
            h = self._sublayer(h, layer.cross_norm, cross_attention, layer.cross_o)
            h = self._sublayer(h, layer.ffn_norm, self._ffn(layer), layer.ffn_out)
        pick = plan.decoder.logits_indices
        if pick is not None:
            h = h.index_select(0, pick)
        if self.t5:
            h = self._normed(h, self.final_norm)
            if self.output_scale is not None:
                h = h * self.output_scale
        return h

    def _ffn(self, layer: _Layer) -> Callable[[torch.Tensor], torch.Tensor]:
        def ffn(x: torch.Tensor) -> torch.Tensor:
            y = layer.ffn_in(x)
            if self.t5 and self.gated:
                gate, up = y.chunk(2, dim=-1)
                return self.act(gate).mul_(up)
            return self.act(y)
        return ffn


def _norm(module: torch.nn.Module) -> tuple:
    """(weight, bias or None) of a LayerNorm / T5LayerNorm."""
    bias = getattr(module, "bias", None)
    return module.weight.detach(), None if bias is None else bias.detach()
