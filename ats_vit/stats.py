"""Intervals and paired tests for accuracies measured on a finite test set, counting
independent items (a source digit placed three times is one item, not three)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["binomial_ci95", "bootstrap_ci95", "paired_bootstrap"]


def binomial_ci95(accuracy: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy measured on ``n`` independent items
    (count items, not images, when several images share a source)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)


def _item_sums(correct: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
    """Per independent item: (correct images, images)."""
    _, index = torch.unique(items, return_inverse=True)
    groups = int(index.max()) + 1
    hits = torch.zeros(groups, dtype=torch.float64).index_add_(0, index, correct.double())
    sizes = torch.zeros(groups, dtype=torch.float64).index_add_(
        0, index, torch.ones_like(correct, dtype=torch.float64)
    )
    return hits, sizes


def _resample(groups: int, rounds: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, groups, (rounds, groups), generator=gen)


def bootstrap_ci95(correct: Tensor, items: Tensor, rounds: int = 2000, seed: int = 0) -> float:
    """Half-width of the 95% percentile interval of the accuracy of ``correct`` (N,) bool,
    resampling the independent ``items`` (N,) (a cluster bootstrap: images of one item stay
    together)."""
    if correct.shape != items.shape or correct.numel() == 0:
        raise ValueError(
            f"correct and items must be non-empty and alike, got {tuple(correct.shape)}, {tuple(items.shape)}"
        )
    hits, sizes = _item_sums(correct, items)
    pick = _resample(len(hits), rounds, seed)
    accuracy = hits[pick].sum(1) / sizes[pick].sum(1)
    low, high = torch.quantile(accuracy, torch.tensor([0.025, 0.975], dtype=accuracy.dtype))
    return float((high - low) / 2)


def paired_bootstrap(
    a: Tensor, b: Tensor, items: Tensor, rounds: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """(accuracy of ``a`` minus that of ``b``, two-sided p-value) for two methods scored on the
    same images (N,) bool, resampling independent ``items`` together for both: the share of
    bootstrap differences on the other side of zero, doubled (at least 1 / rounds)."""
    if not a.shape == b.shape == items.shape:
        raise ValueError(
            f"a, b and items must be alike, got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(items.shape)}"
        )
    hits_a, sizes = _item_sums(a, items)
    hits_b, _ = _item_sums(b, items)
    diff = float((hits_a.sum() - hits_b.sum()) / sizes.sum())
    pick = _resample(len(sizes), rounds, seed)
    boot = (hits_a[pick].sum(1) - hits_b[pick].sum(1)) / sizes[pick].sum(1)
    if diff == 0:
        return 0.0, 1.0
    other_side = (boot <= 0).double().mean() if diff > 0 else (boot >= 0).double().mean()
    return diff, float(min(1.0, max(2 * other_side.item(), 1 / rounds)))
