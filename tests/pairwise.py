"""Pairwise (all-pairs) covering arrays for pytest parametrisation.

Full cross products of kernel parameters explode (dtypes x head dims x GQA ratios x block sizes x
lengths ...); every pair of values still occurs with a greedy all-pairs construction, which is
what catches most interaction bugs at a fraction of the cost.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Sequence

import pytest

ParameterSet = type(pytest.param(None))  # what pytest.param returns


def pairwise(space: dict[str, Sequence[Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Return rows (dicts) such that every pair of values of every two keys occurs in some row."""
    keys = list(space)
    rng = random.Random(seed)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(range(len(keys)), 2)
        for va in range(len(space[keys[a]]))
        for vb in range(len(space[keys[b]]))
    }
    rows: list[list[int]] = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(30):
            a, va, b, vb = rng.choice(sorted(uncovered))
            row = [rng.randrange(len(space[k])) for k in keys]
            row[a], row[b] = va, vb
            # Greedy improvement: pick each free position's value that covers the most pairs.
            for i in rng.sample(range(len(keys)), len(keys)):
                if i in (a, b):
                    continue
                def gain(v):
                    return sum(((min(i, j), (v if i < j else row[j]), max(i, j),
                                 (row[j] if i < j else v)) in uncovered)
                               for j in range(len(keys)) if j != i)
                row[i] = max(range(len(space[keys[i]])), key=gain)
            covered = {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(keys)), 2)}
            g = len(covered & uncovered)
            if g > best_gain:
                best, best_gain = row, g
        rows.append(best)
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(keys)), 2)}
    return [{k: space[k][v] for k, v in zip(keys, row)} for row in rows]


def cases(space: dict[str, Sequence[Any]], seed: int = 0) -> tuple[str, list]:
    """``pytest.mark.parametrize`` arguments for :func:`pairwise` rows. A value given as
    ``pytest.param(value, marks=...)`` is unwrapped and its marks go to every row holding it."""
    keys = list(space)
    rows = []
    for r in pairwise(space, seed):
        values = [r[k] for k in keys]
        marks = [m for v in values if isinstance(v, ParameterSet) for m in v.marks]
        values = [v.values[0] if isinstance(v, ParameterSet) else v for v in values]
        rows.append(pytest.param(*values, marks=marks))
    return ",".join(keys), rows
