"""Runs the reliability probes of tests/probes_*.py in subprocesses, so that a crash (segfault,
SIGFPE, abort, double free) or a hang is a probe result, not a dead test run.

All probes of one target run in one process (one import of torch and the backends); when the
process dies (or a probe hangs and the process is killed), the probe it was running is recorded
as a crash (or a hang) and a fresh process goes on from the next probe.

    python tests/probe_runner.py --summary [TARGET ...]   # table of results per category
    python tests/probe_runner.py TARGET FIRST [--only]    # the child: one JSON line per event

TARGET is ``backend[@device][+debug]`` (see probe_kit.Target); the default summary targets are
torch, cpu and triton on CPU tensors, plus the GPU targets when a GPU is present.
"""

from __future__ import annotations

import importlib
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
MODULES = ("probes_attention", "probes_arguments", "probes_sampling", "probes_direct",
           "probes_contrastive")
PROBE_TIMEOUT_S = 120  # one probe; the slowest take a few seconds in the Triton interpreter
GPU_TARGETS = ("triton@cuda", "cuda@cuda", "triton@cuda+debug", "cuda@cuda+debug")


def probes_for(spec: str) -> list:
    """The probes that run on target ``spec``, in registration order."""
    from probe_kit import PROBES, Target
    for name in MODULES:
        importlib.import_module(name)
    backend = Target.parse(spec).backend
    return [p for p in PROBES if backend in p.backends]


def _child(spec: str, first: int, only: bool) -> None:
    from probe_kit import Target, use_debug

    from fastdecode.ops import BackendUnavailableError
    target = Target.parse(spec)
    use_debug(target)
    probes = probes_for(spec)
    for i, p in enumerate(probes[first:first + 1] if only else probes[first:], start=first):
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


def run_batch(spec: str, probe_timeout_s: float = PROBE_TIMEOUT_S,
              command: Optional[list[str]] = None) -> dict[str, tuple[str, str]]:
    """Run every probe of target ``spec``: ``{probe name: (result, detail)}`` with result one of
    pass, fail, skip, crash, hang (no result within ``probe_timeout_s``). ``command`` replaces
    the child's ``[python, this file]``.

    A probe whose process dies is run again alone: if it
    then survives, the memory was corrupted by an earlier probe of the same process (heap damage
    often kills the process only at a later free), and the crash is charged to the probe run
    just before it."""
    names = [p.name for p in probes_for(spec)]
    run = functools.partial(_run_child, spec, names, probe_timeout_s, command)
    results: dict[str, tuple[str, str]] = {}
    first = 0
    while first < len(names):
        running, death = run(first, False, results)
        if running is None:
            break
        alone: dict[str, tuple[str, str]] = {}
        if running > first and run(running, True, alone)[0] is None:
            results[names[running]] = alone[names[running]]
            results[names[running - 1]] = ("crash", f"the process died in the next probe, "
                                           f"{names[running]}, which passes alone: {death}")
        else:
            results[names[running]] = death
        first = running + 1
    return results


def _run_child(spec: str, names: list[str], probe_timeout_s: float,
               command: Optional[list[str]], first: int, only: bool,
               results: dict) -> tuple[Optional[int], tuple[str, str]]:
    """Run probes from index ``first`` (only that one if ``only``) in one child, recording
    their results; returns (index of the probe the child died in or None, (crash or hang,
    detail))."""
    args = [spec, str(first)] + (["--only"] if only else [])
    proc = subprocess.Popen((command or [sys.executable, __file__]) + args, env=_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, events), daemon=True).start()
    running, hung = None, False
    while True:
        try:
            line = events.get(timeout=probe_timeout_s)
        except queue.Empty:
            proc.kill()
            hung = True
            break
        if line is None:
            break
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] == "start":
                running = event["i"]
            else:
                results[names[event["i"]]] = (event["event"], event["detail"])
                running = None
    err = proc.stderr.read()
    proc.wait()
    if running is None and not only and len(results) < len(names):
        raise RuntimeError(f"probe process for {spec} failed outside a probe:\n{err}")
    if hung:
        return running, ("hang", f"no result within {probe_timeout_s:.0f} s")
    return running, ("crash", _death(proc.returncode, err))


def _pump(stream, events: queue.Queue) -> None:
    """Forward the child's output lines to ``events`` (None at the end), so the parent can wait
    for the next one with a timeout."""
    for line in stream:
        events.put(line)
    events.put(None)


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
            rows[(p.category, spec)][result] += 1
            if result not in ("pass", "skip"):
                problems.append(f"- {spec} {p.name}: {result}: {detail.splitlines()[0][:300]}"
                                if detail else f"- {spec} {p.name}: {result}")
    kinds = ["pass", "fail", "crash", "hang", "skip", "not run"]
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
        _child(sys.argv[1], int(sys.argv[2]), "--only" in sys.argv[3:])
