"""One rule table for the sampling parameters: the ops (scalar and per-row), SamplingParams and
the table's own check accept exactly the same values, with messages naming the parameter, the
range and the row; values at the table's edges never crash a kernel."""

from __future__ import annotations

import math

import pytest
import torch

from fastdecode import SamplingParams, ops
from fastdecode.ops import _rules

TINY, BIG = _rules.FLOAT32_TINY, _rules.FLOAT32_MAX
# Around every bound of the table, plus values that overflow float32 / int64.
PROBES = [0, -0.0, 1, 0.5, 2.5, -1, 1e-45, TINY / 2, TINY, BIG, 3.5e38, 1e39, 2**63 - 1, 2**63,
          2**64, -2**64, 1e300, math.inf, -math.inf, math.nan]
OPS_PARAMS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty"]


def accepts(fn) -> bool:
    try:
        fn()
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", OPS_PARAMS)
def test_ops_scalar_ops_rows_and_sampling_params_agree(name):
    logits = torch.randn(3, 11)
    for value in PROBES:
        table = accepts(lambda: _rules.check(name, value))
        assert accepts(lambda: SamplingParams(**{name: value})) == table, value
        assert accepts(lambda: ops.sample(logits, backend="torch", **{name: value})) == table
        rows = torch.tensor([1.0 if name != "top_k" else 0, float(value), 1.0],
                            dtype=torch.float64)
        assert accepts(lambda: ops.process_logits(logits, backend="torch",
                                                  **{name: rows})) == table, value


@pytest.mark.parametrize("name,value,allowed", [
    ("temperature", 1e39, ">= 0 (0 = greedy)"), ("temperature", -1, ">= 0 (0 = greedy)"),
    ("top_k", 2.5, "an integer"), ("top_p", 0.0, "in (0, 1]"), ("min_p", 1.5, "in [0, 1]"),
    ("repetition_penalty", 1e39, "> 0"), ("seed", -1, "an integer in [0, 2**63)"),
    ("max_new_tokens", 0, "an integer >= 1"), ("min_new_tokens", -1, "an integer >= 0"),
])
def test_messages_name_the_parameter_the_range_and_the_row(name, value, allowed):
    with pytest.raises(ValueError) as e:
        _rules.check(name, value, label=f"--{name.replace('_', '-')}")
    assert str(e.value).startswith(f"--{name.replace('_', '-')} must be {allowed}")
    if name in OPS_PARAMS:
        rows = torch.tensor([1.0, 1.0, value, 1.0], dtype=torch.float64)
        with pytest.raises(ValueError, match=rf"^{name} must be .* at row 2$"):
            ops.sample(torch.randn(4, 9), backend="torch", **{name: rows})


def test_check_returns_what_the_kernels_take():
    assert _rules.check("top_k", 3.0) == 3 and isinstance(_rules.check("top_k", 3.0), int)
    assert isinstance(_rules.check("temperature", 1), float)
    assert _rules.check("top_k", 2**70) == 2**70  # valid: the ops read it as off
    assert SamplingParams(temperature=1, top_k=4.0).top_k == 4
    with pytest.raises(ValueError, match="an integer of 16610 bits"):  # its repr would raise
        _rules.check("temperature", 10**5000)
    with pytest.raises(ValueError, match="temperature"):
        _rules.check("temperature", True)


def test_top_k_beyond_int64_is_off_on_every_path(backend):
    logits = torch.randn(3, 40).to(backend.device)
    seeds = torch.tensor([1, 2, 3], device=backend.device)
    off = ops.sample(logits, top_k=0, seeds=seeds, backend=backend.name)
    for k in (2**64, -2**64, torch.tensor([2.0**70, 0, -1e30], dtype=torch.float64)):
        got = ops.sample(logits, top_k=k, seeds=seeds, backend=backend.name)
        assert torch.equal(got, off)


def test_values_at_the_table_edges_never_crash_a_kernel(backend):
    """Accepted extremes: every row is a token id, or -1 where the scaled logits overflowed
    (the documented result of no finite logit), never an error or a crash."""
    logits = (torch.randn(4, 50) * 5).to(backend.device)
    seen = torch.arange(50).repeat(4, 1).to(backend.device)
    for params in (dict(temperature=TINY), dict(temperature=BIG),
                   dict(repetition_penalty=TINY, seen_tokens=seen),
                   dict(repetition_penalty=BIG, seen_tokens=seen),
                   dict(top_p=1e-300), dict(min_p=1e-300), dict(top_k=2**63 - 1)):
        drawn = ops.sample(logits, backend=backend.name, **params).cpu()
        assert ((drawn >= -1) & (drawn < 50)).all(), params
