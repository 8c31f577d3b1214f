"""The vocabulary of the reliability probes (tests/probes_*.py): what a probe is, where it runs,
and what it expects.

A probe hands one op input that a careless or hostile caller could send and checks the outcome:
a clear error (the right exception type, naming the argument), or the documented result. Probes
run in a subprocess (tests/probe_runner.py) so that a crash is a result, not a dead test run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import fastdecode.ops as ops

BACKENDS = ("torch", "cpu", "triton")


@dataclass(frozen=True)
class Target:
    """Where a batch of probes runs: a backend on a device, with or without the debug mode.
    Spelled ``backend[@device][+debug]``, e.g. ``cpu``, ``triton@cuda+debug``."""

    backend: str
    device: torch.device
    debug: bool = False

    @staticmethod
    def parse(spec: str) -> "Target":
        debug = spec.endswith("+debug")
        spec = spec.removesuffix("+debug")
        backend, _, device = spec.partition("@")
        return Target(backend, torch.device(device or "cpu"), debug)

    @property
    def host_checked(self) -> bool:
        """Whether checked ops read values on the host here (else the kernels guard)."""
        return self.device.type == "cpu" or self.debug

    def __str__(self) -> str:
        text = self.backend if self.device.type == "cpu" else f"{self.backend}@{self.device.type}"
        return text + ("+debug" if self.debug else "")


@dataclass(frozen=True)
class Probe:
    name: str
    category: str
    run: Callable[[Target], None]  # raises AssertionError (or anything) on a wrong outcome
    backends: tuple[str, ...] = BACKENDS


PROBES: list[Probe] = []


def _register(p: Probe) -> None:
    assert all(q.name != p.name for q in PROBES), f"two probes named {p.name}"
    PROBES.append(p)


def probe(category: str, backends: tuple[str, ...] = BACKENDS):
    """Register the decorated ``fn(target)`` as a probe named after it."""
    def register(fn: Callable[[Target], None]) -> Callable[[Target], None]:
        _register(Probe(fn.__name__, category, fn, backends))
        return fn
    return register


def rejects(name: str, category: str, call: Callable[[Target], object], exc, *words: str,
            backends: tuple[str, ...] = BACKENDS) -> None:
    """Register a probe: ``call(target)`` raises ``exc`` with every one of ``words`` in it."""
    _register(Probe(name, category, lambda t: expect_error(lambda: call(t), exc, *words),
                    backends))


def expect_error(call: Callable[[], object], exc, *words: str) -> None:
    try:
        call()
    except exc as e:
        missing = [w for w in words if w not in str(e)]
        assert not missing, f"{type(e).__name__} does not name {missing}: {e}"
        return
    except Exception as e:  # the wrong kind of error is a failure too
        raise AssertionError(f"raised {type(e).__name__} instead of {exc}: {e}") from e
    raise AssertionError(f"returned without an error (expected {exc} naming {list(words)})")


def assert_nan(t: torch.Tensor, what: str) -> None:
    assert t.numel() and bool(t.isnan().all()), f"{what}: expected NaN rows, got {t.flatten()[:4]}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-4):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert not math.isnan(err) and err <= tol, f"{what}: max error {err:.3g} > {tol:g}"


def use_debug(target: Target) -> None:
    """Put the process in the target's debug mode (a batch runs in one process)."""
    ops.set_debug_checks(target.debug)
