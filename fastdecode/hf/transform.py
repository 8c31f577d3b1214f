"""Faster linear layers for small-batch decoding on CPU, without touching the user's model.

A decode step multiplies a few rows (one per sequence) by every weight matrix, so its time is
the time one pass over the weights takes to stream from memory. The C++ extension's
weight-streaming kernel (``fastdecode::packed_linear``, see csrc/cpu/linear_kernel.cpp) reads
weights packed into panels once per call whatever the row count. Over the 135M model's products
(``benchmarks/bench_linear.py``, one thread) nn.Linear's MKL product matches it at one row but
takes 1.4-1.9x its time from 4 to 16 rows, and oneDNN on its pre-packed layout 1.05-1.25x
up to 16 rows. Fusing the q/k/v and gate/up projections turns 5 products into 2. Without the
extension, a contiguous ``[in, out]`` copy (``x @ W.T``) is used.

:class:`LinearLayout` holds packed (and fused) copies of the float32 weights and, inside
``with layout.active():``, routes each exact ``nn.Linear`` through them by setting an instance
``forward`` that is removed again on exit (also on error). Parameters are never modified; the
copies cost the linear weights' memory once more, so :func:`worth_it` limits them to CPU models
that fit comfortably. Copies are cached per model and rebuilt when any weight changes
(``Tensor._version``), so repeated ``generate`` calls do not pay the packing again. No state
depends on the row count: memory stays flat whatever batch sizes a server forms.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from fastdecode.models.packed import Product, weights_signature

# RMSNorm classes that are verbatim copies of Llama's (``weight * (x * rsqrt(mean(x^2) + eps))``
# in float32): one fused ``F.rms_norm`` replaces their six elementwise ops. Gemma's (1 + weight)
# variant and anything unknown keep their own forward.
RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm"}
# Sibling projections that read the same input, fused into one product (first name runs first).
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"),
               ("q", "k", "v"), ("wi_0", "wi_1"))  # the last two: T5's names
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def worth_it(model: nn.Module, max_fraction: float = 0.25) -> bool:
    """Transposed copies pay off for CPU models whose linear weights fit in a quarter of RAM."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        return False
    try:
        import os
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    size = sum(m.weight.nbytes for m in model.modules() if _plain(m))
    return 0 < size <= max_fraction * ram


def _plain(linear: nn.Module) -> bool:
    return (type(linear) is nn.Linear and linear.weight.dtype == torch.float32
            and linear.weight.device.type == "cpu" and not linear._forward_hooks
            and not linear._forward_pre_hooks and "forward" not in linear.__dict__)


def _single(linear: nn.Linear):
    product = Product(linear.weight, linear.bias)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if product.fits(x):
            return product(x)
        return torch.nn.functional.linear(x, linear.weight, linear.bias)

    return forward


class _FusedGroup:
    """One product for sibling projections; each part returns its slice of the fused output."""

    def __init__(self, linears: list[nn.Linear]):
        weight = torch.cat([m.weight for m in linears])
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
        self.product = Product(weight, bias)
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        self._input, self._outputs = None, None

    def part(self, index: int):
        linear = self.linears[index]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.product.fits(x):
                return torch.nn.functional.linear(x, linear.weight, linear.bias)
            if index == 0:
                self._input, self._outputs = x, self.product(x).split(self.sizes, dim=-1)
                return self._outputs[0]
            if self._input is x:
                return self._outputs[index]
            # Called out of order or on another input: the plain product, still exact.
            return torch.nn.functional.linear(x, linear.weight, linear.bias)

        return forward

    def clear(self) -> None:
        self._input, self._outputs = None, None


def _rms_norm(norm: nn.Module):
    weight, eps = norm.weight, norm.variance_epsilon

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        return weight * (y if y.dtype == x.dtype else y.to(x.dtype))

    return forward


class LinearLayout:
    """Packed / fused copies of ``model``'s plain float32 ``nn.Linear`` weights, plus fused
    RMSNorms (see module doc)."""

    def __init__(self, model: nn.Module):
        self.model = model
        signature = weights_signature(model)
        cached = _CACHE.get(model)
        if cached is not None and cached[0] == signature:
            self.forwards, self.groups = cached[1], cached[2]
            return
        self.forwards: list[tuple[nn.Module, object]] = []
        self.groups: list[_FusedGroup] = []
        with torch.no_grad():
            for parent in model.modules():
                for names in FUSE_GROUPS:
                    linears = [getattr(parent, n, None) for n in names]
                    if all(_plain(m) for m in linears) and _compatible(linears):
                        group = _FusedGroup(linears)
                        self.groups.append(group)
                        self.forwards += [(m, group.part(i)) for i, m in enumerate(linears)]
            fused = {id(m) for m, _ in self.forwards}
            for m in model.modules():
                if _plain(m) and id(m) not in fused:
                    self.forwards.append((m, _single(m)))
                elif (type(m).__name__ in RMS_NORMS and hasattr(m, "variance_epsilon")
                      and not m._forward_hooks and not m._forward_pre_hooks
                      and "forward" not in m.__dict__):
                    self.forwards.append((m, _rms_norm(m)))
        _CACHE[model] = (signature, self.forwards, self.groups)

    @contextmanager
    def active(self) -> Iterator[None]:
        try:
            for module, forward in self.forwards:
                module.forward = forward
            yield
        finally:
            for module, _ in self.forwards:
                module.__dict__.pop("forward", None)
            for group in self.groups:
                group.clear()


def _compatible(linears: list[nn.Linear]) -> bool:
    first = linears[0]
    return all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device
               and (m.bias is None) == (first.bias is None) for m in linears)
