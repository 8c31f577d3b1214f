"""Faster linear layers for small-batch decoding on CPU, without touching the user's model.

Decode steps multiply a few rows by every weight matrix, so they are bound by reading weights.
On CPU, BLAS reads an ``[in, out]``-major weight (``x @ W.T`` stored contiguous) markedly faster
than nn.Linear's ``[out, in]`` layout for such skinny products (~8 vs ~6 GB/s per core measured on
the benchmark machine), and fusing the q/k/v and gate/up projections turns 5 products into 2.

:class:`LinearLayout` holds transposed (and fused) copies of the weights and, inside
``with layout.active():``, routes each exact ``nn.Linear`` through them by setting an instance
``forward`` that is removed again on exit (also on error). Parameters are never modified; the
copies cost the linear weights' memory once more, so :func:`worth_it` limits them to CPU models
that fit comfortably. Copies are cached per model and rebuilt when any weight changes
(``Tensor._version``), so repeated ``generate`` calls do not pay the transposition again.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

# Sibling projections that read the same input, fused into one product (first name runs first).
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
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
    size = sum(m.weight.nbytes for m in model.modules() if type(m) is nn.Linear)
    return size <= max_fraction * ram


def _plain(linear: nn.Module) -> bool:
    return (type(linear) is nn.Linear and not linear._forward_hooks
            and not linear._forward_pre_hooks and "forward" not in linear.__dict__)


class _Product:
    """``y = x @ weight_t (+ bias)`` over the flattened leading dims; weight_t: [in, out]."""

    def __init__(self, weight_t: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight_t, self.bias = weight_t, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat,
                                                                          self.weight_t)
        return y.view(*x.shape[:-1], y.shape[-1])


class _FusedGroup:
    """One product for sibling projections; each part returns its slice of the fused output."""

    def __init__(self, linears: list[nn.Linear]):
        weight = torch.cat([m.weight for m in linears])
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
        self.product = _Product(weight.t().contiguous(), bias)
        self.sizes = [m.out_features for m in linears]
        self._input, self._outputs = None, None

    def part(self, index: int):
        start = sum(self.sizes[:index])
        own = _Product(self.product.weight_t[:, start:start + self.sizes[index]],
                       None if self.product.bias is None else
                       self.product.bias[start:start + self.sizes[index]])

        def forward(x: torch.Tensor) -> torch.Tensor:
            if index == 0:
                self._input, self._outputs = x, self.product(x).split(self.sizes, dim=-1)
                return self._outputs[0]
            if self._input is x:
                return self._outputs[index]
            return own(x)  # called out of order or on another input: compute its own slice

        return forward

    def clear(self) -> None:
        self._input, self._outputs = None, None


def _signature(model: nn.Module) -> tuple:
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


class LinearLayout:
    """Transposed / fused copies of ``model``'s plain ``nn.Linear`` weights (see module doc)."""

    def __init__(self, model: nn.Module):
        self.model = model
        signature = _signature(model)
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
                    bias = None if m.bias is None else m.bias.detach()
                    self.forwards.append((m, _Product(m.weight.detach().t().contiguous(), bias)))
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
