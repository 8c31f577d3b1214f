"""A native decoder step for the Llama family (llama, mistral, qwen2, qwen3), free of
transformers' module tree.

Per layer, on the packed tokens of a step (T rows): RMSNorm, one fused q/k/v product, (qwen3)
the q/k RMSNorms as one norm over every head, rotary on q and k together, the paged cache's
append + attention (:meth:`fastdecode.plan.PagedKVCache.attend`), o_proj, residual, RMSNorm,
one fused gate/up product, SiLU * up, down_proj, residual. The final norm and the LM head run on
the plan's ``logits_indices`` rows only. Weights are read from the HF model once (fused copies
where several projections share an input) and reused while the model's parameters are unchanged
(:func:`native_step` caches them per model).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastdecode.models.cpp_loop import CppLoop
from fastdecode.models.layers import Projection, Rotary, rms_norm, silu_and_mul
from fastdecode.models.packed import weights_signature
from fastdecode.models.seq2seq import Seq2SeqStep
from fastdecode.plan import PagedKVCache, StepPlan

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


@dataclass
class _Layer:
    """One decoder layer's weights. qk_norm: [Hq + Hkv, D] (q_norm's weight per query head, then
    k_norm's per key head) or None; window: the sliding window the HF attention passes, or None."""

    input_norm: torch.Tensor
    qkv: Projection
    qk_norm: Optional[torch.Tensor]
    o: Projection
    post_norm: torch.Tensor
    gate_up: Projection
    down: Projection
    window: Optional[int]


class LlamaStep:
    """``step(input_ids, positions, plan, kv) -> [S, V] float32`` logits of ``plan.logits_indices``
    (every row when None), as the HF modules compute them over the same paged cache.

    model: a ``*ForCausalLM`` that :func:`fastdecode.models.support.unsupported_reason` accepts;
    packed, fuse: how projections hold their weights (see :class:`Projection`).
    """

    def __init__(self, model: torch.nn.Module, *, packed: bool, fuse: bool) -> None:
        options = dict(packed=packed, fuse=fuse)
        base, config = model.model, model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = float(base.norm.variance_epsilon)
        self.embed = base.embed_tokens.weight.detach()
        self.rotary = Rotary(base.rotary_emb)
        self.final_norm = base.norm.weight.detach()
        self.head = Projection([model.lm_head], **options)
        self.scale = float(base.layers[0].self_attn.scaling)
        self.layers = [self._layer(layer, config, **options) for layer in base.layers]
        self.cpp_loop = CppLoop.build(self.layers, num_heads=self.num_heads, eps=self.eps,
                                      scale=self.scale, rotary=self.rotary)

    def _layer(self, layer: torch.nn.Module, config, **options: bool) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qk_norm = None
        if hasattr(attn, "q_norm"):
            qk_norm = torch.cat([attn.q_norm.weight.detach().expand(self.num_heads, -1),
                                 attn.k_norm.weight.detach().expand(self.num_kv_heads, -1)])
        # Mistral's attention passes the config's window, qwen2/3's their layer type's.
        window = (attn.sliding_window if hasattr(attn, "sliding_window")
                  else getattr(config, "sliding_window", None))
        return _Layer(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=Projection([attn.q_proj, attn.k_proj, attn.v_proj], **options), qk_norm=qk_norm,
            o=Projection([attn.o_proj], **options),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=Projection([mlp.gate_proj, mlp.up_proj], **options),
            down=Projection([mlp.down_proj], **options), window=window)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: StepPlan,
                 kv: PagedKVCache) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> [S, V] float32."""
        with torch.inference_mode():  # no autograd bookkeeping on the many small ops
            h = self._layers(input_ids, positions, plan, kv)
        # The head runs outside: its logits are ordinary tensors that callers may modify in place.
        return self.head(h).float()

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: StepPlan,
                kv: PagedKVCache) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> [S, H]: the final norm's output at the plan's
        ``logits_indices`` rows."""
        h = F.embedding(input_ids, self.embed)
        if self.cpp_loop is not None and self.cpp_loop.applies(h, plan, kv):
            h = self.cpp_loop(h, positions, plan, kv)
        else:
            h = self._python_layers(h, positions, plan, kv)
        if plan.logits_indices is not None:
            h = h.index_select(0, plan.logits_indices)
        return rms_norm(h, self.final_norm, self.eps)

    def _python_layers(self, h: torch.Tensor, positions: torch.Tensor, plan: StepPlan,
                       kv: PagedKVCache) -> torch.Tensor:
        """h: [T, H] embeddings -> [T, H] after every layer: the reference loop, op by op."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        t = h.shape[0]
        rotate = self.rotary.rotation(positions, h.dtype)
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(h, layer.input_norm, self.eps))
            qk = qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d)
            if layer.qk_norm is not None:
                qk = rms_norm(qk, layer.qk_norm, self.eps)
            qk = rotate(qk)
            value = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
            out = kv.attend(plan, index, qk[:, :hq], qk[:, hq:], value, scale=self.scale,
                            softcap=None, sliding_window=layer.window)
            h = layer.o.add_to(h, out.view(t, hq * d))
            gate_up = layer.gate_up(rms_norm(h, layer.post_norm, self.eps))
            h = layer.down.add_to(h, silu_and_mul(gate_up))
        return h


def native_step(model: torch.nn.Module, *, packed: bool,
                fuse: bool) -> LlamaStep | Seq2SeqStep:
    """The native step of ``model`` (a :class:`Seq2SeqStep` for encoder-decoder models; built
    once per model and weight layout, rebuilt after any parameter changes)."""
    key = (weights_signature(model), packed, fuse)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        build = Seq2SeqStep if model.config.is_encoder_decoder else LlamaStep
        step = build(model, packed=packed, fuse=fuse)
    _CACHE[model] = (key, step)
    return step
