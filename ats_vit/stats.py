"""Intervals for accuracies measured on a finite test set."""

from __future__ import annotations

import math

__all__ = ["binomial_ci95"]


def binomial_ci95(accuracy: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy measured on ``n`` independent items
    (count items, not images, when several images share a source)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)
