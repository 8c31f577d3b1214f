"""The building blocks of the native decoder step: projections, RMSNorm and rotary embedding.

Each mirrors the arithmetic of the transformers module it replaces (same operation order, same
dtype casts), so that a native step's logits equal the HF modules' within float rounding.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fastdecode.models.packed import Product


class Projection:
    """``y = x @ W.T (+ b)`` for one or several ``nn.Linear`` reading the same input, their
    outputs side by side (q/k/v, gate/up).

    packed: run on the streaming kernel's packed copy (:class:`~fastdecode.models.packed.Product`,
    float32 CPU weights) up to the rows it serves; fuse: without packing, concatenate several
    parts once into one weight (a copy: one product per call instead of one per part). Products
    the packed copy does not serve (prefill) and unfused parts run on the original weights, each
    part's product written into its columns of one output (no concatenation afterwards).
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], *, packed: bool, fuse: bool) -> None:
        weights = [m.weight.detach() for m in linears]
        biases = [None if m.bias is None else m.bias.detach() for m in linears]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            biases = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                      for w, b in zip(weights, biases)]
        self.parts = list(zip(weights, biases))
        packed = packed and all(w.dtype == torch.float32 and w.device.type == "cpu"
                                for w in weights)
        single = len(weights) == 1
        self.product, self.weight, self.bias = None, None, None
        if packed or (fuse and not single):
            fused_w = weights[0] if single else torch.cat(weights)
            fused_b = biases[0] if single or biases[0] is None else torch.cat(biases)
            if packed:
                self.product = Product(fused_w, fused_b)
            else:
                self.weight, self.bias = fused_w, fused_b
        if single:
            self.weight, self.bias = self.parts[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, sum of out features]."""
        if self.product is not None and self.product.fits(x):
            return self.product(x)
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        return self._into_columns(x)

    def _into_columns(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., sum of out]: each part's product written into its columns."""
        flat = x.reshape(-1, x.shape[-1])
        out = x.new_empty(flat.shape[0], sum(w.shape[0] for w, _ in self.parts))
        start = 0
        for w, b in self.parts:
            cols = out[:, start:start + w.shape[0]]
            if b is None:
                torch.mm(flat, w.t(), out=cols)
            else:
                torch.addmm(b, flat, w.t(), out=cols)
            start += w.shape[0]
        return out.view(*x.shape[:-1], out.shape[-1])

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual: [T, out]; x: [T, in] -> ``residual + self(x)``, as one GEMM with the
        residual as its accumulator where the product runs on the original weight, float32 and
        without bias (in 16-bit dtypes the GEMM would skip the rounding of the product that HF's
        add sees)."""
        if self.product is not None and self.product.fits(x):
            return residual + self.product(x)
        if self.weight is not None and self.bias is None and self.weight.dtype == torch.float32:
            return torch.addmm(residual, x, self.weight.t())
        return residual + self(x)


@functools.cache
def cpu_kernels() -> bool:
    """Whether the C++ extension's one-pass elementwise layers are built (RMSNorm, rotary,
    SiLU-and-multiply: csrc/cpu/layer_kernels.cpp). torch runs each as several ops, each a pass
    and a parallel region, which on a small model's decode step costs more than the work."""
    from fastdecode.ops import _backends
    if not (_backends.is_available("cpu") and hasattr(torch.ops.fastdecode, "silu_and_mul")):
        return False
    from fastdecode.ops import _extension  # noqa: F401  (registers the ops' fakes)
    return True


def _fused(x: torch.Tensor) -> bool:
    """Whether ``x``'s layer runs on the C++ kernels (float32 CPU tensors)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and cpu_kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H]; weight: [H] (or any shape broadcasting against x) -> [..., H]:
    ``weight * (x / rms(x))`` with the normalisation in float32 and the product in x's dtype, as
    Llama's RMSNorm computes it."""
    if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:
        if _fused(x):
            return torch.ops.fastdecode.rms_norm(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * y.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate, then up) -> [T, I]: ``silu(gate) * up``."""
    if _fused(gate_up):
        return torch.ops.fastdecode.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class Rotary:
    """Rotary position embedding from a model's own rotary module (``inv_freq`` [D / 2] float32,
    ``attention_scaling``), for frequencies that do not depend on the sequence length."""

    def __init__(self, rotary: torch.nn.Module) -> None:
        self.inv_freq = rotary.inv_freq.detach().float()
        self.scaling = float(rotary.attention_scaling)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
        """positions: [T] int64 -> (cos, signed sin): [T, 1, D] each in ``dtype``, built once per
        step. The sine's first half is negated so that :meth:`apply` needs no ``rotate_half``."""
        freqs = positions.float()[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(dtype)
        sin = (emb.sin() * self.scaling).to(dtype)
        half = freqs.shape[-1]
        sin[:, :half].neg_()
        return cos[:, None], sin[:, None]

    def rotation(self, positions: torch.Tensor,
                 dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """positions: [T] int64 -> the step's rotation ``x: [T, H, D] -> [T, H, D]`` (last dim
        contiguous), which may rotate ``x`` in place: on float32 CPU tensors one C++ pass per
        call that computes the tables itself, elsewhere :meth:`apply` over the step's
        :meth:`tables`."""
        if dtype == torch.float32 and positions.device.type == "cpu" and cpu_kernels():
            def rotate(x: torch.Tensor) -> torch.Tensor:
                torch.ops.fastdecode.rotary_embedding(x, positions, self.inv_freq, self.scaling)
                return x
            return rotate
        cos, sin = self.tables(positions, dtype)
        return lambda x: Rotary.apply(x, cos, sin)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] (last dim contiguous) -> [T, H, D] contiguous:
        ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) = (-x2, x1)``; the swap of
        halves times the signed sine gives the same products."""
        t, h, d = x.shape
        out = x * cos
        swapped = x.reshape(t, h, 2, d // 2).flip(2).view(t, h, d)
        out += swapped.mul_(sin)
        return out
