"""The CUDA kernels compile with nvcc alone, for every instantiation and target architecture.

Runs tools/compile_check.py (sm_80 and sm_90a, warnings as errors, each expected kernel present
in each cubin) and prints its report into the test log. Skips when nvcc is absent, unless
``FASTDECODE_REQUIRE_NVCC=1`` (set by CI), which turns that into a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import compile_check  # noqa: E402

BUDGET_S = 600  # a few minutes on 2 busy cores; anything near this means the check grew


def test_cuda_kernels_compile(capsys):
    if compile_check.find_nvcc() is None:
        if os.environ.get("FASTDECODE_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc not found but FASTDECODE_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py")],
                          capture_output=True, text=True, timeout=BUDGET_S)
    with capsys.disabled():  # the report belongs in the CI log even when the test passes
        print("\n" + proc.stdout + proc.stderr)
    assert proc.returncode == 0, "CUDA compile check failed (report above)"


def test_expected_kernels_cover_the_dispatch_lists():
    names = set(compile_check.expected_kernels().values())
    assert compile_check.head_dims() == [64, 80, 96, 128, 256]
    assert "paged_decode_kernel<__nv_bfloat16, 80>" in names
    # attention, merge, sample, append_kv copy widths, contrastive
    assert len(names) == 3 * 5 + 3 + 3 + 4 + 3
    assert "contrastive_kernel<__nv_bfloat16>" in names


def test_sass_rules_catch_what_they_promise():
    """The machine-code rules, on hand-written disassembly: a decode kernel with MUFU.TANH and
    16-bit shared loads, a sampler with a CAS loop and a spill all fail; a clean one passes."""
    import sass_check

    sass = """
        Function : _ZN10fastdecode7kernels6detail19paged_decode_kernelI6__halfLi128EEEvNS_1PE
        /*0010*/                   LDS.U16 R4, [R2+0x10] ;
        /*0020*/              @!P0 MUFU.TANH R5, R5 ;
        /*0030*/                   LDS.128 R8, [R2] ;
        Function : _ZN10fastdecode7kernels6detail13sample_kernelIfEEvNS0_14SamplingParamsE
        /*0010*/                   ATOMS.CAST.SPIN.64 P0, [R2], R4, R6 ;
        /*0020*/                   STL [R1+0x4], R3 ;
        Function : _ZN10fastdecode7kernels6detail16append_kv_kernelI5uint4EEvNS0_1PE
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
    """
    found = sass_check.violations(sass_check.opcodes_by_function(sass))
    text = "\n".join(found)
    assert "has LDS.U16" in text and "has MUFU.TANH" in text
    assert "has ATOMS.CAST.SPIN.64" in text and "has STL" in text
    assert "append_kv" not in text
    assert len(found) == 4  # tanh, 16-bit loads, CAS, local memory


TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](ATen|c10|torch|pybind11)/', re.MULTILINE)
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def nvcc_reachable_headers(source: Path) -> set[Path]:
    """``source`` and every project file it includes, transitively (quoted includes)."""
    seen, todo = set(), [source.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [(path.parent / name).resolve()
                 for name in LOCAL_INCLUDE.findall(path.read_text())
                 if (path.parent / name).exists()]
    return seen


def test_no_torch_header_reaches_nvcc():
    """nvcc compiles the kernels and their plain launchers only; the torch adapters live in .cpp
    files that the host compiler builds like the CPU adapters.
    Every .cu / .cuh file and every project header it includes must be free of torch headers."""
    sources = sorted([*(ROOT / "csrc").rglob("*.cu"), *(ROOT / "csrc").rglob("*.cuh")])
    assert any(s.parent.name == "cuda" for s in sources)  # the build's nvcc units are scanned
    offenders = {str(h.relative_to(ROOT)) for s in sources for h in nvcc_reachable_headers(s)
                 if TORCH_INCLUDE.search(h.read_text())}
    assert not offenders, f"torch headers reach nvcc through {sorted(offenders)}"


def test_include_scan_sees_torch_headers(tmp_path):
    """The scan above follows quoted includes and sees a torch header two levels down."""
    (tmp_path / "a.cu").write_text('#include "b.h"\n')
    (tmp_path / "b.h").write_text('#include <cstdint>\n#include "c.h"\n')
    (tmp_path / "c.h").write_text('#pragma once\n  #include <ATen/ATen.h>\n')
    headers = nvcc_reachable_headers(tmp_path / "a.cu")
    assert len(headers) == 3
    assert [h.name for h in headers if TORCH_INCLUDE.search(h.read_text())] == ["c.h"]


def test_torch_adapters_compile_with_the_host_compiler(capsys):
    """The adapters (csrc/cuda/*.cpp: torch and c10/cuda headers) compile with g++ and warnings
    as errors, as the build compiles them (a CPU build of torch cannot link them here)."""
    nvcc = compile_check.find_nvcc()
    if nvcc is None:
        if os.environ.get("FASTDECODE_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc not found but FASTDECODE_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found (the adapters need the CUDA toolkit's headers)")
    with capsys.disabled():
        assert compile_check.check_adapters(nvcc)
