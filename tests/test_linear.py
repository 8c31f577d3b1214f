"""The weight-streaming linear product of the fast-linear path (``fastdecode::packed_linear`` on
weights packed by ``fastdecode::pack_linear_weight``): float64 references at awkward sizes, rows
independent of their batchmates and of the thread count, argument errors, schema and fakes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdecode import ops
from fastdecode.hf import transform
from fastdecode.models.layers import Projection
from fastdecode.models.packed import STREAM_MAX_ROWS, pack

pytestmark = pytest.mark.skipif(not ops.is_available("cpu"), reason="C++ extension not built")

# (in_features, out_features): single elements, features that are not a multiple of any vector
# width or panel, a tiny model's shapes, and a panel count that does not divide evenly.
SHAPES = [(1, 1), (7, 33), (31, 65), (96, 160), (577, 47), (130, 100)]
# Up to kMaxRows rows in registers, then passes of row tiles (remainder tiles included), then
# groups of 64 rows (70, 131: a second, partial group).
ROWS = [*range(1, 10), 12, 13, 17, 25, 64, 70, 131]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.fastdecode.packed_linear(x, pack(weight), bias, weight.shape[0])


def _assert_close_to_float64(got, x, weight, bias):
    """The kernel's error against float64 is at most twice nn.Linear's float32 error, plus two
    float32 ulps of the largest output (the rounding of the result itself)."""
    b64 = None if bias is None else bias.double()
    ref = F.linear(x.double(), weight.double(), b64)
    assert got.shape == ref.shape and got.dtype == torch.float32
    err32 = (F.linear(x, weight, bias).double() - ref).abs().max().item()
    ulps = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 2 * err32 + ulps


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_matches_float64_reference(rows, in_features, out_features):
    g = torch.Generator().manual_seed(rows * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=g)
    # Bias on every other case, alternating along both parameters.
    bias = torch.randn(out_features, generator=g) if (rows + len(SHAPES)) % 2 else None
    x = torch.randn(rows, in_features, generator=g)
    _assert_close_to_float64(_linear(x, weight, bias), x, weight, bias)


def test_strided_and_batched_inputs():
    weight, bias = torch.randn(70, 45), torch.randn(70)
    wide = torch.randn(5, 60)[:, 3:48]          # rows 60 apart: read in place
    every_other = torch.randn(5, 90)[:, ::2]     # inner stride 2: copied
    batched = torch.randn(2, 3, 45)              # leading dims kept
    for x in (wide, every_other, batched):
        got = _linear(x, weight, bias)
        assert got.shape == (*x.shape[:-1], 70)
        _assert_close_to_float64(got, x, weight, bias)
    assert _linear(torch.randn(0, 45), weight, bias).shape == (0, 70)


@pytest.mark.parametrize("rows", [2, 7, 13, 17, 64])
def test_each_row_is_independent_of_its_batchmates(rows):
    """A row's result is bitwise the same alone or among others (greedy tokens must not depend
    on which requests share the step)."""
    weight, bias = torch.randn(200, 99), torch.randn(200)
    packed = pack(weight)
    x = torch.randn(rows, 99)
    together = torch.ops.fastdecode.packed_linear(x, packed, bias, 200)
    for i in range(rows):
        alone = torch.ops.fastdecode.packed_linear(x[i:i + 1], packed, bias, 200)
        assert torch.equal(together[i:i + 1], alone)


def test_thread_count_does_not_change_the_result():
    """Threads split the output panels; every output is still one thread's ordered sum."""
    weight = torch.randn(3000, 300)  # several panels of 256 KiB and more per thread
    packed, x = pack(weight), torch.randn(5, 300)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.fastdecode.packed_linear(x, packed, None, 3000))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    _assert_close_to_float64(results[0], x, weight, None)


def test_packing_pads_the_last_panel_with_zeros():
    panel = torch.ops.fastdecode.packed_linear_panel_width()
    weight = torch.randn(panel + 3, 5)
    packed = torch.full((2, 5, panel), float("nan"))
    torch.ops.fastdecode.pack_linear_weight(packed, weight)
    assert torch.equal(packed[0].t(), weight[:panel])
    assert torch.equal(packed[1, :, :3].t(), weight[panel:])
    assert not packed[1, :, 3:].any()


def test_bad_arguments_name_the_argument():
    lib = torch.ops.fastdecode
    panel = lib.packed_linear_panel_width()
    weight = torch.randn(40, 16)
    packed = pack(weight)
    x = torch.randn(3, 16)
    with pytest.raises(TypeError, match="packed_linear: x must be Float"):
        lib.packed_linear(x.double(), packed, None, 40)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., in_features\] with in_features = 16"):
        lib.packed_linear(torch.randn(3, 15), packed, None, 40)
    with pytest.raises(ValueError, match="out_features must be in"):
        lib.packed_linear(x, packed, None, packed.shape[0] * panel + 1)
    with pytest.raises(ValueError, match="packed must be a contiguous"):
        lib.packed_linear(x, packed.transpose(1, 2), None, 40)
    with pytest.raises(ValueError, match=r"bias must have shape \[40\]"):
        lib.packed_linear(x, packed, torch.randn(41), 40)
    with pytest.raises(ValueError, match="packed must have shape"):
        lib.pack_linear_weight(torch.empty(1, 16, panel), weight)
    with pytest.raises(TypeError, match="pack_linear_weight: weight must be Float"):
        lib.pack_linear_weight(packed, weight.half())


def test_ops_pass_opcheck():
    """Schemas, fake implementations and the mutated-argument annotation agree with the kernels."""
    weight, bias = torch.randn(37, 20), torch.randn(37)
    packed = pack(weight)
    torch.library.opcheck(torch.ops.fastdecode.pack_linear_weight, (packed, weight))
    for x in (torch.randn(3, 20), torch.randn(2, 1, 20)):
        torch.library.opcheck(torch.ops.fastdecode.packed_linear, (x, packed, bias, 37))


def test_decode_step_products_run_on_the_streaming_kernel():
    """One kernel call per fused group, per other linear and for the LM head; none through
    nn.Linear's own product."""
    from tiny import tiny_model

    model = tiny_model("llama")
    x = torch.randint(3, model.config.vocab_size, (1, 1))
    with torch.no_grad(), transform.LinearLayout(model).active():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    layers = model.config.num_hidden_layers
    assert calls.get("fastdecode::packed_linear") == 4 * layers + 1  # qkv, o, gate_up, down
    assert "aten::linear" not in calls and "aten::addmm" not in calls


@pytest.mark.parametrize("rows", [3, STREAM_MAX_ROWS + 5])
def test_packed_projection_on_either_side_of_the_streaming_rows(rows):
    """Packed q/k/v-like parts (one with a bias) and a single packed part: the streaming kernel
    up to STREAM_MAX_ROWS rows, the original weights beyond (each part written into its
    columns), with leading dims kept; add_to as the residual sum."""
    g = torch.Generator().manual_seed(rows)
    parts = [torch.nn.Linear(45, n, bias=bias)
             for n, bias in ((40, True), (13, False), (13, False))]
    for m in parts:
        for t in m.parameters():
            t.data = torch.randn(t.shape, generator=g)
    x = torch.randn(rows, 45, generator=g)
    fused = Projection(parts, packed=True, fuse=False)
    assert fused.product is not None and fused.weight is None
    weight = torch.cat([m.weight for m in parts]).detach()
    bias = torch.cat([parts[0].bias, torch.zeros(26)]).detach()
    _assert_close_to_float64(fused(x), x, weight, bias)
    _assert_close_to_float64(fused(x.view(1, rows, 45))[0], x, weight, bias)
    single = Projection(parts[1:2], packed=True, fuse=False)
    residual = torch.randn(rows, 13, generator=g)
    ref = residual.double() + F.linear(x.double(), parts[1].weight.double())
    torch.testing.assert_close(single.add_to(residual, x).double(), ref, atol=1e-4, rtol=1e-5)
