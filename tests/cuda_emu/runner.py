"""Builds tests/cuda_emu/emu_ops.cpp (the CUDA kernel headers on the CPU emulator of emu.h) and
wraps its entry points for the tests: each call takes CPU tensors laid out as the kernels expect
and returns the kernel's status or output."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

EMU = Path(__file__).resolve().parent
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PARTITION = 256  # kPartitionTokens of csrc/kernels/params.h


def build(out_dir: Path) -> Optional[ctypes.CDLL]:
    """Compiles the emulator library into ``out_dir``; None without g++."""
    cxx = shutil.which("g++")
    if cxx is None:
        return None
    out = out_dir / "libfastdecode_cuda_emu.so"
    subprocess.run([cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
                    "-Wno-unknown-pragmas", f"-I{EMU / 'include'}", str(EMU / "emu_ops.cpp"),
                    "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.emu_paged_decode_workspace_floats.restype = ctypes.c_int64
    lib.emu_sampling_float_workspace.restype = ctypes.c_int64
    lib.emu_sampling_int_workspace.restype = ctypes.c_int64
    lib.emu_paged_decode.argtypes = [ctypes.c_void_p] * 10 + [
        ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    return lib


def ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def i64(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def append_kv(lib, key, value, k_cache, v_cache, slots) -> None:
    """key, value: [T, Hkv, D]; k_cache, v_cache: [N, P, Hkv, D]; slots: [T] int64."""
    n, p, hkv, d = k_cache.shape
    strides = i64(*key.stride()[:2], *value.stride()[:2], *k_cache.stride()[:3])
    rc = lib.emu_append_kv(ptr(key), ptr(value), ptr(k_cache), ptr(v_cache), ptr(slots),
                           ptr(strides), ctypes.c_int64(key.shape[0]), ctypes.c_int64(n * p),
                           hkv, d, p, key.element_size())
    assert rc == 0


def paged_decode(lib, query, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                 softcap: float = 0.0, window: int = 0, alibi=None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention into ``out`` (default: a NaN-poisoned [B, Hq, D] tensor)."""
    b, hq, d = query.shape
    n, p, hkv, _ = k_cache.shape
    m = block_tables.shape[1]
    out = torch.full_like(query, float("nan")) if out is None else out
    ws = torch.full((max(1, lib.emu_paged_decode_workspace_floats(b, hq, d, m, p)),),
                    float("nan"))
    strides = i64(*query.stride()[:2], *out.stride()[:2], *k_cache.stride()[:3],
                  block_tables.stride(0))
    sizes = torch.tensor([b, hq, hkv, d, p, m, n], dtype=torch.int32)
    rc = lib.emu_paged_decode(ptr(out), ptr(query), ptr(k_cache), ptr(v_cache),
                              ptr(block_tables), ptr(seq_lens), ptr(alibi), ptr(ws),
                              ptr(strides), ptr(sizes), scale, softcap, window,
                              DTYPE_CODE[query.dtype])
    assert rc == 0
    return out


def sample(lib, logits, params, seeds, offsets, num_sms: int = 4) -> torch.Tensor:
    """[B] int64 ids drawn by the CUDA sampler; params: a normalised SamplingTensors. num_sms
    sets the CTAs per row as the adapter would on a GPU with that many SMs."""
    b, v = logits.shape
    splits = lib.emu_sampling_num_splits(ctypes.c_int64(b), ctypes.c_int64(v), num_sms)
    floats = torch.full((lib.emu_sampling_float_workspace(b, ctypes.c_int64(v), splits),),
                        float("nan"))
    ints = torch.full((lib.emu_sampling_int_workspace(b, splits),), -9, dtype=torch.int32)
    tickets = torch.zeros(b, dtype=torch.int32)
    out = torch.full((b,), -7, dtype=torch.int64)
    seen = params.seen_tokens
    rc = lib.emu_sample(ptr(logits), ptr(floats), ptr(ints), ptr(tickets), ptr(out),
                        ptr(params.temperature),
                        ptr(params.top_k), ptr(params.top_p), ptr(params.min_p),
                        ptr(params.repetition_penalty), ptr(seen), ptr(seeds), ptr(offsets),
                        ctypes.c_int64(logits.stride(0)),
                        ctypes.c_int64(0 if seen is None else seen.stride(0)), b, v,
                        0 if seen is None else seen.shape[1], splits, DTYPE_CODE[logits.dtype])
    assert rc == 0
    assert (tickets == 0).all(), "the last CTA of each row resets its ticket"
    return out


def contrastive(lib, expert, amateur, alpha, plausibility) -> torch.Tensor:
    """[B, V] float32 scores of the CUDA kernel (expert, amateur: one dtype, unit stride along V;
    alpha, plausibility: [B] float32), into a NaN-poisoned output."""
    b, v = expert.shape
    out = torch.full((b, v), float("nan"))
    strides = i64(expert.stride(0), amateur.stride(0), out.stride(0))
    rc = lib.emu_contrastive(ptr(expert), ptr(amateur), ptr(alpha), ptr(plausibility), ptr(out),
                             ptr(strides), b, v, DTYPE_CODE[expert.dtype])
    assert rc == 0
    return out

