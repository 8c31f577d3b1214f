"""The CUDA kernels compile with nvcc alone, for every instantiation and target architecture.

Runs tools/compile_check.py (sm_80 and sm_90a, warnings as errors, each expected kernel present
in each cubin) and prints its report into the test log. Skips when nvcc is absent, unless
``FASTDECODE_REQUIRE_NVCC=1`` (set by CI), which turns that into a failure.
"""

from __future__ import annotations

import os
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
