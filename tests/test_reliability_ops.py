"""Reliability of the ops against bad input: every probe of tests/probes_*.py on every backend
(torch, cpu, and triton under the interpreter; the GPU targets when a GPU is present), each
outcome produced in a subprocess (tests/probe_runner.py) so that a crash fails its probe instead
of ending the test run. ``python tests/probe_runner.py --summary`` prints the counts per
category."""

from __future__ import annotations

import functools

import pytest
import torch

import probe_runner
from conftest import _skip_reason
from probe_kit import Target

CPU_TARGETS = ("torch", "cpu", "triton")


@functools.cache
def results(spec: str) -> dict[str, tuple[str, str]]:
    return probe_runner.run_batch(spec)


@pytest.mark.parametrize("spec, probe", [
    pytest.param(spec, p, id=f"{spec}-{p.name}")
    for spec in CPU_TARGETS for p in probe_runner.probes_for(spec)])
def test_probe(spec, probe):
    backend = Target.parse(spec).backend
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(reason)
    result, detail = results(spec).get(probe.name, ("not run", ""))
    if result == "skip":
        pytest.skip(detail)
    assert result == "pass", f"{result}: {detail}"


@pytest.mark.gpu
@pytest.mark.parametrize("spec", probe_runner.GPU_TARGETS)
def test_probes_on_gpu(spec):
    """CUDA tensors: values unchecked on the host outside the debug mode, so the probes hold
    the kernels to the guard contract; with +debug they expect the host errors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    got = results(spec)
    bad = {name: r for name, r in got.items() if r[0] not in ("pass", "skip")}
    report = "\n".join(f"{name}: {r[0]}: {r[1][:500]}" for name, r in bad.items())
    assert not bad, report
