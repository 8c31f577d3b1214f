"""Runs the reliability probes of tests/probes_*.py in subprocesses, so that a crash (segfault,
SIGFPE, abort, double free) or a hang is a probe result, not a dead test run.

All probes of one target run in one process (one import of torch and the backends); when the
process dies, the probe it was running is recorded as a crash and a fresh process goes on from
the next probe.

    python tests/probe_runner.py --summary [TARGET ...]   # table of results per category
    python tests/probe_runner.py TARGET FIRST             # the child: one JSON line per event

TARGET is ``backend[@device][+debug]`` (see probe_kit.Target); the default summary targets are
torch, cpu and triton on CPU tensors, plus the GPU targets when a GPU is present.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ("probes_attention", "probes_arguments", "probes_sampling", "probes_direct")
BATCH_TIMEOUT_S = 300
GPU_TARGETS = ("triton@cuda", "cuda@cuda", "triton@cuda+debug", "cuda@cuda+debug")


def probes_for(spec: str) -> list:
    """The probes that run on target ``spec``, in a fixed order."""
    from probe_kit import PROBES, Target
    for name in MODULES:
        importlib.import_module(name)
    backend = Target.parse(spec).backend
    return [p for p in PROBES if backend in p.backends]


def _child(spec: str, first: int) -> None:
    from probe_kit import Target, use_debug

    from fastdecode.ops import BackendUnavailableError
    target = Target.parse(spec)
    use_debug(target)
    for i, p in enumerate(probes_for(spec)[first:], start=first):
        print(json.dumps({"i": i, "event": "start"}), flush=True)
        try:
            p.run(target)
            result, detail = "pass", ""
        except BackendUnavailableError as e:  # e.g. the cuda backend's packed form
            result, detail = "skip", str(e)
        except Exception as e:  # any wrong outcome, reported, never fatal
            result = "fail"
            detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
        print(json.dumps({"i": i, "event": result, "detail": detail[-2000:]}), flush=True)


def _environment() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    if "TRITON_INTERPRET" not in env:
        import torch
        env["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
    return env


def run_batch(spec: str, timeout_s: float = BATCH_TIMEOUT_S) -> dict[str, tuple[str, str]]:
    """Run every probe of target ``spec``: ``{probe name: (result, detail)}`` with result one of
    pass, fail, skip, crash, hang."""
    names = [p.name for p in probes_for(spec)]
    results: dict[str, tuple[str, str]] = {}
    first, deadline = 0, time.monotonic() + timeout_s
    while first < len(names):
        proc = subprocess.Popen([sys.executable, __file__, spec, str(first)], env=_environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            ended = "crash"
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            ended = "hang"
        running = None
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event["event"] == "start":
                running = event["i"]
            else:
                results[names[event["i"]]] = (event["event"], event["detail"])
                running = None
        if running is None:
            if proc.returncode != 0 and len(results) < len(names):
                raise RuntimeError(f"probe process for {spec} failed outside a probe:\n{err}")
            break
        results[names[running]] = (ended, _death(proc.returncode, err) if ended == "crash"
                                   else f"no result within {timeout_s:.0f} s")
        if ended == "hang":
            break
        first = running + 1
    return results


def _death(returncode: int, stderr: str) -> str:
    how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
           else f"exit status {returncode}")
    return f"{how}; stderr: {stderr[-600:]}"


def summary(specs: list[str]) -> str:
    """A markdown table: per category and target, probes run and their results."""
    rows, problems = defaultdict(Counter), []
    for spec in specs:
        results = run_batch(spec)
        for p in probes_for(spec):
            result, detail = results.get(p.name, ("not run", ""))
            if result != "pass" and p.pending and spec.split("@")[0] in p.pending:
                result = "pending"
            rows[(p.category, spec)][result] += 1
            if result not in ("pass", "skip"):
                problems.append(f"- {spec} {p.name}: {result}: {detail.splitlines()[0][:300]}"
                                if detail else f"- {spec} {p.name}: {result}")
    kinds = ["pass", "fail", "crash", "hang", "skip", "pending", "not run"]
    lines = ["| category | target | probes | " + " | ".join(kinds) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " |"]
    for (category, spec), counts in sorted(rows.items()):
        lines.append(f"| {category} | {spec} | {sum(counts.values())} | "
                     + " | ".join(str(counts[k]) for k in kinds) + " |")
    return "\n".join(lines + [""] + problems)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    if sys.argv[1] == "--summary":
        import torch
        default = ["torch", "cpu", "triton"] + (list(GPU_TARGETS) if torch.cuda.is_available()
                                                else [])
        print(summary(sys.argv[2:] or default))
    else:
        _child(sys.argv[1], int(sys.argv[2]))
