"""The op layer itself: backend selection, availability errors, the debug mode of the argument
checks, sampling-parameter validation and the torch.library registration (schemas + fake
implementations) of the C++ ops. Bad inputs of every op and backend: test_reliability_ops.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdecode import ops
from fastdecode.ops import _backends


def _cache(n=4, p=16, hkv=2, d=64, dtype=torch.float32):
    return torch.randn(n, p, hkv, d, dtype=dtype), torch.randn(n, p, hkv, d, dtype=dtype)


def test_auto_on_cpu_prefers_the_extension():
    mod = _backends.resolve("auto", "paged_attention", torch.device("cpu"))
    expected = "cpu_backend" if ops.is_available("cpu") else "torch_backend"
    assert mod.__name__.endswith(expected)


def test_auto_on_cuda_prefers_triton_until_cuda_is_validated(monkeypatch):
    monkeypatch.setattr(_backends, "is_available", lambda name: True)
    monkeypatch.setattr(_backends, "_load", lambda name: type("M", (), {"name": name})())
    monkeypatch.setenv("FASTDECODE_AUTO_CUDA", "0")
    cuda = torch.device("cuda")
    assert _backends.resolve("auto", "paged_attention", cuda).name == "triton"
    monkeypatch.setenv("FASTDECODE_AUTO_CUDA", "1")
    assert _backends.resolve("auto", "paged_attention", cuda).name == "cuda"
    # The CUDA backend has no packed prefill and no process_logits: auto goes to Triton.
    assert _backends.resolve("auto", "paged_prefill", cuda).name == "triton"
    assert _backends.resolve("auto", "process_logits", cuda).name == "triton"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.sample(torch.randn(2, 8), backend="tpu")


def test_cuda_backend_on_cpu_tensors_names_what_is_missing():
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.sample(torch.randn(2, 8), backend="cuda")


def test_cuda_backend_refuses_ops_it_does_not_cover():
    with pytest.raises(ops.BackendUnavailableError, match="process_logits"):
        ops.process_logits(torch.randn(2, 8), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET"):
        _backends.resolve("triton", "sample", torch.device("cpu"))


def test_debug_mode_switch(monkeypatch):
    """CPU tensors are always value-checked on the host; CUDA tensors only in the debug mode."""
    from fastdecode.ops import _checks
    monkeypatch.setattr(_checks, "_debug", False)
    cuda = torch.device("cuda")
    assert _checks.host_checks(torch.device("cpu")) and not _checks.host_checks(cuda)
    assert ops.set_debug_checks(True) is False
    assert ops.debug_checks() and _checks.host_checks(cuda)
    assert ops.set_debug_checks(False) is True
    assert not _checks.host_checks(cuda)


@pytest.mark.parametrize("value, expected", [("1", "True"), ("0", "False")])
def test_debug_mode_from_the_environment(value, expected):
    env = dict(os.environ, FASTDECODE_DEBUG_CHECKS=value)
    code = "import fastdecode.ops as ops; print(ops.debug_checks())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, check=True)
    assert proc.stdout.strip() == expected


def test_wide_ids_saturate_instead_of_wrapping():
    """int64 ids narrowed to int32 stay out of range: 2**32 + 1 must not become block 1."""
    from fastdecode.ops._checks import to_index
    wide = torch.tensor([2**32 + 1, -2**32 + 1, 5, -1])
    assert to_index(wide, torch.int32, -1, 8).tolist() == [8, -1, 5, -1]
    assert wide.to(torch.int32).tolist()[:2] == [1, 1]  # what a plain cast would have done


@pytest.mark.parametrize("param, value, match", [
    ("temperature", -0.5, "temperature must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("min_p", 1.5, r"min_p must be in \[0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("top_k", 2.5, "top_k must be an integer"),
])
def test_invalid_scalar_parameters_name_the_parameter(param, value, match):
    with pytest.raises(ValueError, match=match):
        ops.sample(torch.randn(3, 10), backend="torch", **{param: value})


def test_invalid_row_parameter_names_the_row():
    temps = torch.tensor([1.0, 0.5, -2.0, 1.0])
    with pytest.raises(ValueError, match="temperature must be >= 0.*at row 2"):
        ops.sample(torch.randn(4, 10), temperature=temps, backend="torch")
    with pytest.raises(ValueError, match=r"top_p must be \[4\]|top_p must be a number or a \[4\]"):
        ops.sample(torch.randn(4, 10), top_p=torch.ones(3), backend="torch")


def test_seen_tokens_outside_the_vocabulary():
    with pytest.raises(ValueError, match="seen_tokens must be ids in \\[0, 10\\).*row 1"):
        ops.sample(torch.randn(2, 10), repetition_penalty=1.2,
                   seen_tokens=torch.tensor([[1, -1], [3, 10]]), backend="torch")


needs_ext = pytest.mark.skipif(not ops.is_available("cpu"), reason="C++ extension not built")


@needs_ext
def test_cxx_ops_pass_opcheck():
    """Schemas, fake implementations and aliasing annotations agree with the kernels."""
    k, v = _cache(n=3, p=4, hkv=1, d=16)
    bt = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32)
    sl = torch.tensor([5, 3], dtype=torch.int32)
    q, out = torch.randn(2, 2, 16), torch.empty(2, 2, 16)
    lib = torch.ops.fastdecode
    torch.library.opcheck(lib.paged_attention, (out, q, k, v, bt, sl, None, 0.25, True, 0.0, 0,
                                                None))
    torch.library.opcheck(lib.append_kv, (torch.randn(2, 1, 16), torch.randn(2, 1, 16), k, v,
                                          torch.tensor([3, -1])))
    logits = torch.randn(2, 11)
    rows = (torch.tensor([0.7, 0.0]), torch.tensor([3, 0], dtype=torch.int32),
            torch.tensor([0.9, 1.0]), torch.tensor([0.0, 0.1]), torch.tensor([1.2, 1.0]),
            torch.tensor([[1, 1], [-1, 4]]))
    torch.library.opcheck(lib.process_logits, (logits, *rows))
    torch.library.opcheck(lib.apply_repetition_penalty, (logits, rows[-1], rows[-2]))
    torch.library.opcheck(lib.sample, (logits, *rows, torch.tensor([5, 6]), torch.tensor([0, 1])),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ext
@pytest.mark.parametrize("case, error, match", [
    ("tokens", ValueError, r"^fastdecode\.paged_attention: query: the decode form takes one "
     r"token per sequence, got 3 tokens for 2 sequences"),
    ("out", ValueError, r"out must be \[tokens, 3, 16\], got \[2, 2, 16\]$"),
    ("softcap", ValueError, r"softcap must be >= 0 \(0 = off\), got -1\.5$"),
    ("dtype", TypeError, r"query must be Half, got Float$"),
])
def test_cxx_messages_format_numbers_shapes_and_dtypes(case, error, match):
    """The C++ adapters build their messages without iostreams (csrc/common/message.h; an
    integer formatted through c10::str's ostringstream killed a CUDA process): integers, shapes,
    doubles and dtypes read as torch prints them."""
    k, v = _cache(n=3, p=4, hkv=1, d=16)
    bt, sl = torch.tensor([[2, 0], [1, 2]], dtype=torch.int32), torch.tensor([5, 3],
                                                                             dtype=torch.int32)
    q, softcap = torch.randn(2, 2, 16), 0.0
    out = torch.empty_like(q)
    if case == "tokens":
        q = out = torch.randn(3, 2, 16)
    elif case == "out":
        q = torch.randn(2, 3, 16)
    elif case == "softcap":
        softcap = -1.5
    else:
        k, v = k.half(), v.half()
    with pytest.raises(error, match=match):
        torch.ops.fastdecode.paged_attention(out, q, k, v, bt, sl, None, 0.25, True, softcap, 0,
                                             None)


@needs_ext
def test_cxx_sample_compiles_without_graph_breaks():
    def step(logits, seeds, offsets):
        return ops.sample(logits, temperature=0.8, top_k=5, seeds=seeds, offsets=offsets,
                          backend="cpu")

    logits, seeds, offsets = torch.randn(3, 50), torch.arange(3), torch.zeros(3, dtype=torch.long)
    compiled = torch.compile(step, fullgraph=False, backend="eager")
    torch.testing.assert_close(compiled(logits, seeds, offsets), step(logits, seeds, offsets))
