"""Compile every Triton kernel variant the launchers can pick for a real Hopper GPU (sm_90a),
without one: catches what the interpreter cannot (ops without a compiled lowering, shared-memory
overflow, register spills).

The variants come from the launchers' own configuration functions (``attention_configs``,
``sampling_configs``, ...), so this covers exactly what they can choose. Arguments get the
specialisation of a typical launch: 16-byte aligned pointers, and the strides / sizes that are
multiples of 16 for head dims that are (64, 80, 96, 112, 128, 256). Compilation runs in one
subprocess with TRITON_INTERPRET=0 (the test session interprets kernels when there is no GPU).
Registers and spills are read from the cubin with cuobjdump (a loaded kernel's ``n_spills`` needs
a device); shared memory from the compiled metadata. ``FASTDECODE_TRITON_PYTHON`` names another
interpreter for the compile worker, e.g. a venv with the Triton release of the GPU machines.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from fastdecode.triton import attention, contrastive, kv_cache, sampling  # noqa: E402

ARCH = 90
MAX_SHARED = 232448  # bytes of shared memory per block on H100 (227 KB)
_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
       torch.float64: "fp64"}


def variants() -> dict[str, tuple]:
    """name -> (kernel attribute path, pointer types, aligned int args, constexprs, options)."""
    out = {}
    for c in attention.attention_configs():
        dt = _TY[c.dtype]
        name = (f"attention-{dt}-d{c.head_dim_pad}-rows{c.block_rows}-"
                f"{'packed' if c.packed else 'decode'}{'-relative' if c.relative else ''}")
        out[name] = ("attention._paged_attention_kernel",
                     dict(out_ptr=dt, q_ptr=dt, k_cache_ptr=dt, v_cache_ptr=dt,
                          part_out_ptr="fp32", part_lse_ptr="fp32", alibi_slopes_ptr="fp32",
                          relative_bias_ptr="fp32",
                          block_tables_ptr="i32", seq_lens_ptr="i32", cu_seqlens_q_ptr="i32"),
                     ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb",
                      "stride_kp", "stride_kh", "head_dim", "block_size", "partition_size"),
                     dict(BLOCK_ROWS=c.block_rows, BLOCK_N=c.block_n,
                          HEAD_DIM_PAD=c.head_dim_pad, PACKED=c.packed, RELATIVE=c.relative,
                          UPCAST=False),
                     dict(num_warps=c.num_warps, num_stages=c.num_stages))
    for dtype in attention.FLOAT_DTYPES:
        for d in attention.HEAD_DIM_PADS:
            dt = _TY[dtype]
            out[f"merge-{dt}-d{d}"] = (
                "attention._merge_partitions_kernel",
                dict(out_ptr=dt, part_out_ptr="fp32", part_lse_ptr="fp32", seq_lens_ptr="i32"),
                ("stride_ot", "stride_oh", "head_dim", "partition_size"),
                dict(PARTS_BLOCK=attention.MERGE_PARTS_BLOCK, HEAD_DIM_PAD=d),
                dict(num_warps=4))
        out[f"append_kv-{_TY[dtype]}"] = (
            "kv_cache._append_kv_kernel",
            dict(key_ptr=dt, value_ptr=dt, k_cache_ptr=dt, v_cache_ptr=dt, slot_mapping_ptr="i64"),
            ("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_cache_slot", "head_dim",
             "token_numel"),
            dict(BLOCK=kv_cache.APPEND_BLOCK), dict(num_warps=4))
    shape_args = ("stride_lb", "vocab")  # per model: multiples of 16 for typical vocabularies
    params = dict(temperature_ptr="fp32", top_k_ptr="i32", top_p_ptr="fp32")
    stats = dict(stat_max_ptr="fp32", stat_arg_ptr="i32", stat_nan_ptr="i32")
    state = dict(lo_ptr="i32", floor_ptr="i32", part_ptr="fp32", total_ptr="fp32")
    for c in sampling.sampling_configs():
        dt = _TY[c.dtype]
        sizes = dict(BLOCK=c.block, SPLITS=c.max_splits)
        mode = "process" if c.write_scores else "sample"
        out[f"sampling-final-{dt}-{mode}"] = (
            "sampling_kernels._final_kernel",
            dict(out_ptr="fp32" if c.write_scores else "i64", last_ptr="i32", logits_ptr=dt,
                 min_p_ptr="fp32", **state, **stats, **params),
            shape_args + ("stride_ob",) * c.write_scores,
            dict(WRITE_SCORES=c.write_scores, **sizes), dict(num_warps=c.num_warps))
        if c.write_scores:
            continue
        out[f"sampling-stats-{dt}"] = (
            "sampling_kernels._stats_kernel",
            dict(logits_ptr=dt, temperature_ptr="fp32", **stats), shape_args,
            dict(BLOCK=c.block), dict(num_warps=c.num_warps))
        out[f"sampling-radix-{dt}"] = (
            "sampling_kernels._radix_kernel", dict(logits_ptr=dt, **state, **stats, **params),
            shape_args, dict(RADIX=c.radix_block, **sizes), dict(num_warps=c.num_warps))
        out[f"sampling-draw-{dt}"] = (
            "sampling_kernels._draw_kernel",
            dict(out_ptr="i64", last_ptr="i32", floor_ptr="i32", total_ptr="fp32", logits_ptr=dt,
                 temperature_ptr="fp32", min_p_ptr="fp32", seeds_ptr="i64", offsets_ptr="i64",
                 **stats), shape_args, sizes, dict(num_warps=c.num_warps))
    for dtype in sampling.LOGIT_DTYPES:
        out[f"repetition_penalty-{_TY[dtype]}"] = (
            "sampling_kernels._repetition_penalty_kernel",
            dict(out_ptr="fp32", logits_ptr=_TY[dtype], seen_ptr="i64", penalty_ptr="fp32"),
            ("stride_lb", "stride_ob", "vocab"), dict(BLOCK=sampling.BLOCK), dict(num_warps=4))
    for e_dtype, a_dtype in itertools.product(sampling.LOGIT_DTYPES, repeat=2):
        out[f"contrastive-{_TY[e_dtype]}-{_TY[a_dtype]}"] = (
            "contrastive._contrastive_kernel",
            dict(out_ptr="fp32", expert_ptr=_TY[e_dtype], amateur_ptr=_TY[a_dtype],
                 alpha_ptr="fp32", plausibility_ptr="fp32"),
            (), dict(BLOCK=contrastive.BLOCK), dict(num_warps=4))
    out["philox_uniform"] = ("sampling_kernels._philox_uniform_kernel",
                             dict(out_ptr="fp32", seeds_ptr="i64", offsets_ptr="i64"), (),
                             dict(BLOCK_SIZE=sampling.BLOCK), dict(num_warps=4))
    return out


FLOAT_ARGS = {"scale", "softcap"}


def _compile(kernel, pointers, aligned, constexprs, options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs or (name in pointers and pointers[name] is None):
            signature[name] = "constexpr"
            consts.setdefault(name, None)  # a None pointer, as the launcher passes it
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
            if name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options)


def _resource_usage(cubin: bytes, workdir: Path) -> dict:
    """Registers and stack frame of the cubin triton built (these kernels have no local arrays
    or calls, so any stack is register spill space)."""
    import triton.backends.nvidia as nvidia

    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    report = subprocess.run([str(Path(nvidia.__file__).parent / "bin" / "cuobjdump"),
                             "--dump-resource-usage", str(path)],
                            capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", report))
    return {"registers": int(usage["REG"]), "spills": int(usage["STACK"]) + int(usage["LOCAL"])}


def _worker(workdir: Path) -> None:
    """Runs in the subprocess: one JSON line per variant."""
    import importlib

    for name, (path, pointers, aligned, constexprs, options) in variants().items():
        module, attr = path.split(".")
        kernel = getattr(importlib.import_module(f"fastdecode.triton.{module}"), attr)
        start = time.time()
        try:
            compiled = _compile(kernel, pointers, aligned, constexprs, options)
            row = {"shared": compiled.metadata.shared,
                   **_resource_usage(compiled.asm["cubin"], workdir)}
        except Exception as exc:  # reported per variant by the test
            row = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
        row.update(name=name, seconds=round(time.time() - start, 2))
        print(json.dumps(row), flush=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict]:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    python = os.environ.get("FASTDECODE_TRITON_PYTHON", sys.executable)
    proc = subprocess.run([python, __file__, str(tmp_path_factory.mktemp("ptx"))],
                          env=env, capture_output=True, text=True, timeout=900)
    rows = {r["name"]: r for r in map(json.loads, filter(None, proc.stdout.splitlines()))}
    if not rows:
        pytest.fail(f"compile worker failed:\n{proc.stderr[-4000:]}")
    total = sum(r["seconds"] for r in rows.values())
    print(f"\ncompiled {len(rows)} variants in {total:.0f} s")
    return rows


@pytest.mark.parametrize("name", list(variants()))
def test_compiles_for_hopper(compiled, name):
    row = compiled.get(name)
    assert row is not None, "worker did not reach this variant"
    assert "error" not in row, row.get("error")
    assert row["shared"] <= MAX_SHARED, f"{row['shared']} bytes of shared memory"
    assert row["spills"] == 0, f"{row['spills']} bytes of register spills ({row})"


def test_launcher_choices_are_enumerated():
    """What the launchers pick for any size is among the compiled variants."""
    configs = set(attention.attention_configs())
    for dtype in attention.FLOAT_DTYPES:
        for head_dim in (1, 8, 63, 64, 80, 96, 112, 128, 129, 200, 256):
            for group in (1, 2, 7, 8, 16, 17, 64, 65, 128):
                for packed, relative in itertools.product((False, True), (False, True)):
                    assert attention.attention_config(dtype, head_dim, group, packed,
                                                      relative) in configs
    assert {c.dtype for c in sampling.sampling_configs()} == set(sampling.LOGIT_DTYPES)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
