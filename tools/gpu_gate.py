"""The GPU validation gate: runs the GPU backends' tests in parallel shards and writes the
validation record that ``backend="auto"`` trusts (fastdecode/ops/_backends.py).

The gate is the shared op tests' ``cuda`` and ``triton`` instances plus the backend-specific
test files. Instances of ops a backend does not implement are deselected at collection
(tests/conftest.py), so every collected test must pass: a failure, an error, a shard that did
not finish, or a skip (other than a head_dim the CUDA kernels are not built for) counts against
the ops that test exercises. An op is validated for a backend when at least one of its tests
ran and all of them passed.

    python tools/gpu_gate.py --out DIR [--shards N] [--deadline SECONDS]

Writes DIR/gate_summary.txt, DIR/gate_failures.txt (each failure's message; the first failure
of each shard in full, since a sticky CUDA error fails the rest of its shard; the tail of the log
of a shard that did not finish), DIR/gate_shard_<i>.log and DIR/gpu_validation.json (the previous
record of other device families kept), and exits 0 when every op of both backends validated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATE_FILES = ["tests/test_attention.py", "tests/test_append_kv.py", "tests/test_sampling.py",
              "tests/test_sampling_stats.py", "tests/test_cuda_specific.py",
              "tests/test_triton_specific.py", "tests/test_triton_guards.py",
              "tests/test_static_decode.py",
              "tests/test_cross_attention.py", "tests/test_relative_bias.py",
              "tests/test_contrastive.py"]
GATE_KEYWORDS = "cuda or triton"
ALLOWED_SKIPS = ("does not build head_dim",)  # the CUDA kernels' head_dim list, by design
COVERAGE = {"cuda": {"append_kv", "paged_attention", "sample", "contrastive_logits"},
            "triton": {"append_kv", "paged_attention", "paged_prefill", "paged_relative_bias",
                       "process_logits", "sample", "apply_repetition_penalty",
                       "contrastive_logits"}}
# (pattern on "module::test[params]", ops the test exercises); first match wins, no match:
# every op of the backend (a failure there invalidates the whole backend).
OPS_BY_TEST = [
    (r"test_attention::(test_packed|test_long_prefill)|test_attention::\w+\[.*True\]",
     {"paged_prefill"}),
    (r"test_attention::", {"paged_attention"}),
    (r"test_relative_bias::test_relative_bias_matches_reference\[.*-False-",
     {"paged_relative_bias"}),
    (r"test_relative_bias::test_relative_bias_(without|matches)", {"paged_prefill"}),
    (r"test_relative_bias::", {"paged_relative_bias", "paged_prefill"}),
    (r"test_contrastive::", {"contrastive_logits"}),
    (r"test_cross_attention::test_decode", {"paged_attention"}),
    (r"test_cross_attention::", {"paged_attention", "paged_prefill"}),
    (r"test_append_kv::test_append_then_attend", {"append_kv", "paged_attention"}),
    (r"test_append_kv::", {"append_kv"}),
    (r"test_sampling::test_process_logits", {"process_logits"}),
    (r"test_sampling::test_repetition_penalty", {"apply_repetition_penalty"}),
    (r"test_sampling(_stats)?::", {"sample", "process_logits"}),
    (r"test_cuda_specific::test_(split_kv|batch_invariance|unaligned|unsupported_head_dim|"
     r"adapter_errors|decode_guards)", {"paged_attention"}),
    (r"test_cuda_specific::test_large_cache", {"append_kv", "paged_attention"}),
    (r"test_cuda_specific::test_sample", {"sample"}),
    (r"test_cuda_specific::test_append_kv", {"append_kv"}),
    # CUDA-graph capture / replay of whole decode steps: reported, validating no op.
    (r"test_static_decode::", set()),
]


def backend_of(test_id: str) -> str | None:
    """The GPU backend a test instance exercises, from its parameters or its file."""
    params = re.search(r"\[(\w+)", test_id)
    if params and params.group(1) in COVERAGE:
        return params.group(1)
    for name in COVERAGE:
        if f"test_{name}_" in test_id:
            return name
    return None


def ops_of(test_id: str, backend: str) -> set[str]:
    for pattern, ops in OPS_BY_TEST:
        if re.search(pattern, test_id):
            return ops & COVERAGE[backend]
    return set(COVERAGE[backend])


def collect() -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-k", GATE_KEYWORDS, *GATE_FILES],
                          cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit(f"gate: nothing collected\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return ids


def start_shard(name: str, part: list[str], out: Path):
    """(process, junit path, log file) of one pytest process over ``part``."""
    junit = out / f"{name}.xml"
    log = (out / f"{name}.log").open("w")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *part]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), junit, log


def crashed_test(log_text: str, part: list[str]) -> str | None:
    """The test of ``part`` a crashed pytest process was in: the innermost test function of the
    faulthandler's stack ("File ".../tests/x.py", line N in test_name"), matched to the first
    not yet reported id of that function."""
    frames = re.findall(r'File ".*?(tests/\w+\.py)", line \d+ in (test_\w+)', log_text)
    if not frames:
        return None
    path, func = frames[0]
    return next((t for t in part if path in t and t.split("::")[-1].split("[")[0] == func), None)


def run_shards(ids: list[str], shards: int, deadline: float,
               out: Path) -> tuple[dict[str, str], list[str]]:
    """(test id -> "passed" | "failed" | "skipped: reason" | "crashed" | "not run", failure
    report lines), over parallel shards. A shard whose process crashes (a segfault loses its
    junit file) is run again without the test it crashed in, while the deadline allows."""
    pending = [(f"gate_shard_{i}", ids[i::shards]) for i in range(shards) if ids[i::shards]]
    outcomes = {test_id: "not run" for test_id in ids}
    report = []
    while pending:
        procs = [(name, part, *start_shard(name, part, out)) for name, part in pending]
        pending = []
        for name, part, proc, junit, log in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            shard, failures = read_junit(junit, part)
            outcomes.update(shard)
            report.append(f"=== {name}: {len(shard)} of {len(part)} reported, "
                          f"{len(failures)} failed, exit {proc.returncode}")
            for n, (test_id, text) in enumerate(failures):
                lines = text.splitlines()
                report += [f"--- {test_id}"] + (
                    lines[-60:] if n == 0 else [ln for ln in lines if ln.startswith("E ")][:3])
            if len(shard) == len(part):
                continue
            text = Path(log.name).read_text(errors="replace")
            crash = crashed_test(text, part) if proc.returncode not in (0, 1) else None
            lines = text.splitlines()
            fatal = next((i for i, ln in enumerate(lines) if "Fatal Python error" in ln), None)
            report += [f"--- {name} did not finish (crashed in {crash}); its log:"]
            report += lines[fatal:fatal + 12] if fatal is not None else lines[-30:]
            if crash is not None and time.monotonic() < deadline - 10:
                outcomes[crash] = "crashed"
                rest = [t for t in part if t != crash]
                pending.append((f"{name}r", rest))
    return outcomes, report


def read_junit(path: Path, part: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(test id of ``part`` -> outcome, [(failed test id, its failure text)]) of one shard's
    junit file."""
    out, failures = {}, []
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return out, failures
    for case in root.iter("testcase"):
        tail = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
        test_id = next((t for t in part if t.endswith(tail)), tail)
        children = {child.tag: child for child in case}
        bad = children.get("failure", children.get("error"))
        if bad is not None:
            out[test_id] = "failed"
            failures.append((test_id, bad.text or bad.get("message", "")))
        elif "skipped" in children:
            out[test_id] = "skipped: " + children["skipped"].get("message", "")
        else:
            out[test_id] = "passed"
    return out, failures


def verdicts(outcomes: dict[str, str]) -> dict[str, dict[str, str]]:
    """backend -> op -> "passed" or why not."""
    evidence = {b: {op: [] for op in ops} for b, ops in COVERAGE.items()}
    for test_id, outcome in outcomes.items():
        backend = backend_of(test_id)
        if backend is None:
            continue
        ok = outcome == "passed" or (outcome.startswith("skipped")
                                     and any(a in outcome for a in ALLOWED_SKIPS))
        for op in ops_of(test_id.replace(".py::", "::").split("/")[-1], backend):
            evidence[backend][op].append((test_id, outcome, ok))
    result = {}
    for backend, per_op in evidence.items():
        result[backend] = {}
        for op, tests in per_op.items():
            bad = [f"{t} ({o})" for t, o, ok in tests if not ok]
            ran = [t for t, o, ok in tests if o == "passed"]
            result[backend][op] = ("passed" if ran and not bad else
                                   f"{len(bad)} bad: {'; '.join(bad[:3])}" if bad else "no test")
    return result


def device_record(result: dict[str, dict[str, str]], outcomes: dict[str, str]) -> dict:
    import torch
    import triton

    major, minor = torch.cuda.get_device_capability()
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip().splitlines()
    counts = {}
    for outcome in outcomes.values():
        key = outcome.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return {f"sm_{major}{minor}": {
        "passed": {b: sorted(op for op, v in ops.items() if v == "passed")
                   for b, ops in result.items()},
        "device": torch.cuda.get_device_name(), "driver": driver[0] if driver else "unknown",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": triton.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tests": counts}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shards", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--deadline", type=float, default=150.0, help="seconds for all shards")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline
    ids = collect()
    outcomes, report = run_shards(ids, args.shards, deadline, args.out)
    (args.out / "gate_failures.txt").write_text("\n".join(report) + "\n")
    result = verdicts(outcomes)
    lines = [f"{len(ids)} tests in {args.shards} shards"]
    lines += [f"{k}: {sum(o.startswith(k) for o in outcomes.values())}"
              for k in ("passed", "failed", "crashed", "skipped", "not run")]
    lines += [f"{b} {op}: {v}" for b, ops in result.items() for op, v in sorted(ops.items())]
    ok = all(v == "passed" for ops in result.values() for v in ops.values())
    lines.append("gate: " + ("VALIDATED (both GPU backends)" if ok else "NOT validated"))
    (args.out / "gate_summary.txt").write_text("\n".join(lines) + "\n")
    (args.out / "gate_outcomes.json").write_text(json.dumps(outcomes, indent=1))
    record_path = ROOT / "fastdecode" / "gpu_validation.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    record.update(device_record(result, outcomes))
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    (args.out / "gpu_validation.json").write_text(text)
    record_path.write_text(text)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
