"""The native decoder step's C++ elementwise layers (``torch.ops.fastdecode.rms_norm``,
``rotary_embedding``, ``silu_and_mul``; csrc/cpu/layer_kernels.cpp) against float64 references,
with flash-attention's 2x rule against torch's own float32 ops (the formulas transformers' modules
run); awkward sizes, strided inputs, the single-thread and the thread-team paths, and the
argument checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastdecode.models import layers
from reference import assert_close_2x

pytestmark = pytest.mark.skipif(not layers.cpu_kernels(), reason="C++ extension not built")
ops = torch.ops.fastdecode

# rows x width: one row, a decode batch, and enough elements for the thread team (>= 2**16).
SHAPES = [(1, 1), (1, 7), (5, 33), (8, 256), (3, 4099), (300, 260)]


@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_rms_norm(rows, hidden):
    wide = torch.randn(rows, hidden + 3) * 3
    x = wide[:, 1:hidden + 1]  # a row stride that is not the width
    weight = torch.randn(hidden)
    eps = 1e-6
    got = ops.rms_norm(x, weight, eps)
    x64 = x.double()
    ref64 = weight.double() * (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps))
    ref32 = torch.rms_norm(x, (hidden,), weight, eps)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert_close_2x(got, ref64, ref32, atol=1e-6)


def test_rms_norm_keeps_leading_dims():
    x, weight = torch.randn(2, 3, 5, 40), torch.randn(40)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5),
                               ops.rms_norm(x.reshape(-1, 40), weight, 1e-5).view(2, 3, 5, 40))


def _rotary64(x, positions, inv_freq, scaling):
    """x [T, H, D] -> float64 rotary with the tables of transformers' rotary modules (the
    float32 product of position and frequency, then cos / sin in float64)."""
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).double()
    cos, sin = (emb.cos() * scaling)[:, None], (emb.sin() * scaling)[:, None]
    x64 = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x64[..., half:], x64[..., :half]), dim=-1)
    return x64 * cos + rotated * sin


@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 1, 2), (3, 5, 6), (8, 6, 64),
                                                   (2, 3, 80), (4, 2, 96), (7, 3, 128),
                                                   (200, 4, 112)])
def test_rotary_embedding(tokens, heads, head_dim):
    torch.manual_seed(tokens * heads + head_dim)
    qkv = torch.randn(tokens, heads + 2, head_dim)
    x = qkv[:, 1:heads + 1]  # q/k heads inside a fused projection's output
    positions = torch.randint(0, 40000, (tokens,))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    scaling = 0.9
    before, untouched = x.clone(), (qkv[:, 0].clone(), qkv[:, -1].clone())
    ref64 = _rotary64(before, positions, inv_freq, scaling)
    rotary = layers.Rotary(SimpleNamespace(inv_freq=inv_freq, attention_scaling=scaling))
    ref32 = layers.Rotary.apply(before, *rotary.tables(positions, torch.float32))
    ops.rotary_embedding(x, positions, inv_freq, scaling)
    assert_close_2x(x, ref64, ref32, atol=1e-6)
    assert torch.equal(qkv[:, 0], untouched[0]) and torch.equal(qkv[:, -1], untouched[1])


@pytest.mark.parametrize("rows,width", SHAPES)
def test_silu_and_mul(rows, width):
    gate_up = torch.randn(rows, 2 * width) * 4
    gate_up[0, 0] = -100.0  # exp(-x) overflows to inf: silu is -0
    got = ops.silu_and_mul(gate_up)
    g64, u64 = gate_up.double().chunk(2, dim=-1)
    ref64 = g64 * torch.sigmoid(g64) * u64
    gate, up = gate_up.chunk(2, dim=-1)
    ref32 = torch.nn.functional.silu(gate) * up
    assert got.shape == (rows, width)
    assert_close_2x(got, ref64, ref32, atol=1e-6)


def test_ops_trace():
    x, weight = torch.randn(3, 16), torch.randn(16)
    torch.library.opcheck(ops.rms_norm, (x, weight, 1e-6))
    torch.library.opcheck(ops.silu_and_mul, (torch.randn(3, 10),))
    torch.library.opcheck(ops.rotary_embedding,
                          (torch.randn(3, 2, 8), torch.arange(3), torch.rand(4), 1.0))


@pytest.mark.parametrize("call,message", [
    (lambda: ops.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-6), "x must be"),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6), "weight"),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(8), -1.0), "eps must be"),
    (lambda: ops.silu_and_mul(torch.randn(2, 7)), "gate_up must be"),
    (lambda: ops.rotary_embedding(torch.randn(2, 1, 7), torch.arange(2), torch.rand(3), 1.0),
     "head_dim must be even"),
    (lambda: ops.rotary_embedding(torch.randn(2, 1, 8), torch.arange(3), torch.rand(4), 1.0),
     "positions"),
    (lambda: ops.rotary_embedding(torch.randn(2, 1, 8), torch.arange(2).int(), torch.rand(4),
                                  1.0), "positions must be"),
    (lambda: ops.rotary_embedding(torch.randn(2, 1, 8), torch.arange(2), torch.rand(3), 1.0),
     "inv_freq"),
])
def test_bad_arguments_name_the_parameter(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
