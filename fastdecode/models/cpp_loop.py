"""Every decoder layer of a :class:`~fastdecode.models.llama.LlamaStep` in one C++ call
(``torch.ops.fastdecode.decoder_layers``, csrc/cpu/decoder_step.cpp): the float32 CPU decode
path, where the Python loop's ~10 op calls per layer cost as much as a small model's kernels.

It applies to float32 CPU steps whose products all run on the streaming kernel's packed weights
(at most :data:`~fastdecode.models.packed.STREAM_MAX_ROWS` rows) over a float32 cache of the
C++ backend; everything else (other dtypes and devices, prefill, torch.compile) runs the Python
loop, which stays the reference. Decode steps planned with a shared prefix
(:mod:`fastdecode.plan.cascade`) take the same cascade attention in the loop.
``FASTDECODE_NATIVE_CPP=0`` forces the Python loop.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from fastdecode.models.layers import cpu_kernels
from fastdecode.models.packed import STREAM_MAX_ROWS
from fastdecode.plan import PagedKVCache, StepPlan


def _packed(projection) -> Optional[list]:
    """[packed weight, bias or None] of a projection on the streaming kernel, else None."""
    product = projection.product
    if product is None or product.packed is None:
        return None
    return [product.packed, product.bias]


def _on_cpu_kernels(kv: PagedKVCache) -> bool:
    """Whether the cache's attention runs on the C++ kernels the loop calls directly."""
    from fastdecode.ops import cpu_backend
    return kv._append is cpu_backend and kv._decode is cpu_backend and kv._prefill is cpu_backend


def available() -> bool:
    """Whether the C++ extension with the layer loop is built."""
    return cpu_kernels() and hasattr(torch.ops.fastdecode, "decoder_layers")


class CppLoop:
    """The loop's flat argument list for ``layers`` (the step's ``_Layer`` records).

    Build with :meth:`build`, which returns None where a layer's weights do not fit the loop.
    """

    def __init__(self, flat: list, windows: list[int], num_heads: int, eps: float,
                 scale: float, inv_freq: torch.Tensor, scaling: float) -> None:
        self.flat, self.windows = flat, windows
        self.num_heads, self.eps, self.scale = num_heads, eps, scale
        self.inv_freq, self.scaling = inv_freq, scaling

    @classmethod
    def build(cls, layers: Sequence, *, num_heads: int, eps: float, scale: float,
              rotary) -> Optional["CppLoop"]:
        if not available():
            return None
        flat: list = []
        for layer in layers:
            products = [_packed(p) for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
            norms = (layer.input_norm, layer.post_norm)
            if any(p is None for p in products) or any(
                    n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
                return None
            q_norm = k_norm = None
            if layer.qk_norm is not None:  # [Hq + Hkv, D]: q's weight per head, then k's
                q_norm, k_norm = layer.qk_norm[0], layer.qk_norm[num_heads]
            qkv, o, gate_up, down = products
            flat += [layer.input_norm.contiguous(), *qkv, q_norm, k_norm, *o,
                     layer.post_norm.contiguous(), *gate_up, *down]
        windows = [0 if not layer.window or layer.window <= 0 else int(layer.window)
                   for layer in layers]
        return cls(flat, windows, num_heads, eps, scale, rotary.inv_freq, rotary.scaling)

    def applies(self, h: torch.Tensor, plan: StepPlan, kv: PagedKVCache) -> bool:
        """Whether this step (h: [T, H]) runs here rather than in the Python loop."""
        return (h.dtype == kv.dtype == torch.float32 and h.device.type == "cpu"
                and h.shape[0] <= STREAM_MAX_ROWS and plan.attn.slot_mapping is not None
                and plan.attn.causal
                and not torch.compiler.is_compiling()
                and os.environ.get("FASTDECODE_NATIVE_CPP", "1") != "0"
                and _on_cpu_kernels(kv))

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, plan: StepPlan,
                 kv: PagedKVCache) -> torch.Tensor:
        """h: [T, H] float32 embeddings -> [T, H], every layer applied (in place)."""
        meta = plan.attn
        h = h.contiguous()
        shared = meta.shared_prefix
        torch.ops.fastdecode.decoder_layers(
            h, positions, self.flat, kv.k_caches, kv.v_caches, self.windows, meta.block_tables,
            meta.seq_lens, None if meta.decode_only else meta.cu_seqlens_q, meta.slot_mapping,
            self.inv_freq, self.scaling, self.num_heads, self.eps, self.scale,
            [] if shared is None else [shared.tables, shared.lens, shared.cu_seqlens,
                                       shared.suffix_tables, shared.suffix_lens])
        return h
