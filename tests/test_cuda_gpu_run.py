"""The one-call GPU script and its gate, checked without a GPU: the dry run's plan fits the
window (each step with its limit, total <= 420 s, output under $OUT), and the gate turns test
outcomes into per-op verdicts the way the validation record needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_gate  # noqa: E402

BUDGET_S = 420  # 7 minutes including the build, inside a 10-minute command


def _dry_run(**env) -> list[str]:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_run.sh")], capture_output=True,
                          text=True, env={**os.environ, "GPU_RUN_DRY": "1", **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_dry_run_plan_fits_the_window(tmp_path):
    lines = _dry_run(OUT=str(tmp_path), FASTDECODE_GPU_OUT="")
    steps = [re.match(r"(\w+)\s+limit\s+(\d+) s \(\+(\d+) s grace\)", line) for line in lines]
    steps = [m for m in steps if m]
    assert [m.group(1) for m in steps] == ["info", "build", "gate", "bench_attention",
                                           "bench_sampling"]
    total = int(re.fullmatch(r"total: (\d+) s", lines[-1]).group(1))
    assert total == sum(int(m.group(2)) + int(m.group(3)) for m in steps)
    assert total <= BUDGET_S
    assert f"output: {tmp_path}" in lines
    assert any(str(tmp_path) in line for line in lines if line.startswith("gate"))


def test_output_folder_precedence(tmp_path):
    explicit = tmp_path / "explicit"
    assert f"output: {explicit}" in _dry_run(OUT=str(tmp_path), FASTDECODE_GPU_OUT=str(explicit))


def test_gate_verdicts_per_op():
    outcomes = {
        "tests/test_attention.py::test_decode[cuda-dtype0-64]": "passed",
        "tests/test_attention.py::test_decode[cuda-dtype1-112]":
            "skipped: backend cuda does not build head_dim 112",
        "tests/test_attention.py::test_batch_invariance[triton-True]": "failed",
        "tests/test_attention.py::test_batch_invariance[triton-False]": "passed",
        "tests/test_append_kv.py::test_append_kv[cuda-x]": "passed",
        "tests/test_sampling.py::test_top_k_ties_larger_than_the_candidate_buffer[cuda]":
            "skipped: needs a CUDA GPU",
        "tests/test_cuda_specific.py::test_sample_is_deterministic": "passed",
    }
    result = gpu_gate.verdicts(outcomes)
    assert result["cuda"]["paged_attention"] == "passed"  # an allowed skip does not count
    assert result["cuda"]["append_kv"] == "passed"
    assert result["cuda"]["sample"].startswith("1 bad")  # any other skip does
    assert result["triton"]["paged_prefill"].startswith("1 bad")
    assert result["triton"]["paged_attention"] == "passed"
    assert result["triton"]["process_logits"] == "no test"
    assert gpu_gate.backend_of("tests/test_triton_guards.py::test_append_kv_guards") == "triton"


def test_gate_resumes_a_crashed_shard_without_the_crashing_test(tmp_path):
    """A segfault loses the shard's junit file: the gate names the test it crashed in (from the
    faulthandler stack) and runs the rest of the shard again."""
    folder = tmp_path / "tests"
    folder.mkdir()
    (folder / "test_crashy.py").write_text(
        "import ctypes\nimport pytest\n\n\ndef test_first():\n    pass\n\n\n"
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_crash(x):\n"
        "    if x == 1:\n        ctypes.string_at(0)\n\n\ndef test_fails():\n    assert False\n")
    path = folder / "test_crashy.py"
    ids = [f"{path}::test_first", f"{path}::test_crash[1]", f"{path}::test_crash[2]",
           f"{path}::test_fails"]
    outcomes, report = gpu_gate.run_shards(ids, 1, time.monotonic() + 120, tmp_path)
    assert outcomes == dict(zip(ids, ["passed", "crashed", "passed", "failed"]))
    assert any(f"crashed in {ids[1]}" in line for line in report)
    assert any("Fatal Python error" in line for line in report)
