"""Comparing classifier outputs across requests: labels exactly, scores with a tolerance.

The same input can go through different kernels (alone, or padded inside a batch), and the last
bits of a float32 score then depend on the CPU (seen: 0.5035486817 vs 0.5035486221 on an Intel
Xeon). Ranking can swap two labels whose scores tie within that noise, so rows are compared as
label -> score maps, not as ordered lists.
"""

from __future__ import annotations

import math

TOLERANCE = 1e-4


def _as_map(row: list[dict]) -> dict[str, float]:
    return {d["label"]: d["score"] for d in row}


def scores_close(got, expected, tol: float = TOLERANCE) -> bool:
    """True when `got` and `expected` (a row `[{"label", "score"}]` or a list of rows) hold the same
    labels with scores within `tol`."""
    if got and isinstance(got[0], list):
        return len(got) == len(expected) and all(scores_close(g, e, tol) for g, e in zip(got, expected, strict=True))
    a, b = _as_map(got), _as_map(expected)
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=tol, abs_tol=tol) for k in a)


def assert_scores_close(got, expected, tol: float = TOLERANCE) -> None:
    assert scores_close(got, expected, tol), f"{got} != {expected} (tolerance {tol})"
