"""Linear products on the weight-streaming kernel's packed weights (C++ extension), with a
plain transposed copy as the fallback. Shared by the HF path's linear layout
(:mod:`fastdecode.hf.transform`, which explains the measurements) and the native step.
"""

from __future__ import annotations

from typing import Optional

import torch


def weights_signature(model: torch.nn.Module) -> tuple:
    """Identity, storage and version of every parameter: copies of the weights built from
    ``model`` stay valid while this is unchanged."""
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def _streaming() -> bool:
    """Whether the C++ extension with the weight-streaming linear kernel is built."""
    from fastdecode.ops import _backends
    return _backends.is_available("cpu") and hasattr(torch.ops.fastdecode, "packed_linear")


# Rows up to which the streaming kernel runs; nn.Linear's own product on the original weight
# beyond, where products turn compute bound. On one core over the 135M model's products
# (benchmarks/results/linear_cpu.md) the kernel is 1.61x nn.Linear at 32 rows and 1.22x at 64,
# even at 96 and 0.95x at 128.
STREAM_MAX_ROWS = 64


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] float32 -> the streaming kernel's panels [ceil(out / panel), in, panel],
    in huge pages where the machine allows (the whole copy is streamed once per step)."""
    from fastdecode.ops import _extension  # noqa: F401  (registers the op's fake)
    from fastdecode.ops.memory import zeros
    panel = torch.ops.fastdecode.packed_linear_panel_width()
    out_features, in_features = weight.shape
    packed = zeros((-(-out_features // panel), in_features, panel), dtype=torch.float32)
    torch.ops.fastdecode.pack_linear_weight(packed, weight.detach())
    return packed


class Product:
    """``y = x @ weight.T (+ bias)``; weight: [out, in] float32, copied into the streaming
    kernel's packed layout (or, without the C++ extension, transposed to a contiguous [in, out]).

    Callers check :meth:`fits` first and run the original nn.Linear product otherwise.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.bias = None if bias is None else bias.detach().contiguous()
        self.out_features = weight.shape[0]
        if _streaming():
            self.packed, self.weight_t = pack(weight), None
        else:
            self.packed, self.weight_t = None, weight.detach().t().contiguous()

    def fits(self, x: torch.Tensor) -> bool:
        return self.packed is None or x.numel() <= STREAM_MAX_ROWS * x.shape[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.fastdecode.packed_linear(x, self.packed, self.bias,
                                                      self.out_features)
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat,
                                                                          self.weight_t)
        return y.view(*x.shape[:-1], y.shape[-1])
