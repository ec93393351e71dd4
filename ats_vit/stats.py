"""Intervals and paired tests for accuracies measured on a finite test set, counting
independent items (a source digit placed three times is one item, not three), and the
Benjamini-Hochberg correction for a table's family of tests."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adjust_bh", "binomial_ci95", "bootstrap_ci95", "paired_bootstrap", "paired_test"]


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


def paired_test(a: Tensor, b: Tensor, items: Tensor) -> tuple[float, float]:
    """(accuracy of ``a`` minus that of ``b``, exact two-sided p-value) for two methods scored
    on the same images (N,) bool, whose images come from the independent ``items`` (N,).

    The exact sign-flip test over items: under "no difference", each item's difference in
    correct images (``a``'s minus ``b``'s) is as likely positive as negative, so the p-value is
    the share of the 2^items sign patterns whose summed difference is at least as far from
    zero as the one measured, computed exactly (no resampling floor, so a p-value corrected
    for a hundred comparisons can still be significant). With one image per item this is the
    exact McNemar test. Items of several checkpoints (each seed drawing its own test set) are
    pooled by giving each (seed, item) its own id.
    """
    if not a.shape == b.shape == items.shape or a.numel() == 0:
        raise ValueError(
            f"a, b and items must be non-empty and alike, got {tuple(a.shape)}, {tuple(b.shape)}, "
            f"{tuple(items.shape)}"
        )
    hits_a, sizes = _item_sums(a, items)
    hits_b, _ = _item_sums(b, items)
    per_item = (hits_a - hits_b).round().long()
    diff = float(per_item.sum() / sizes.sum())
    magnitudes = per_item.abs()
    magnitudes = magnitudes[magnitudes > 0]
    if magnitudes.numel() == 0:
        return 0.0, 1.0
    null = _sign_flip_null(magnitudes)  # P(sum = v) for v in -M..M
    reach = int(magnitudes.sum())
    observed = abs(int(per_item.sum()))
    values = torch.arange(-reach, reach + 1).abs()
    return diff, float(min(1.0, null[values >= observed].sum().item()))


def _sign_flip_null(magnitudes: Tensor) -> Tensor:
    """The exact distribution of sum(s_i * m_i) over independent fair signs s_i, for the
    positive integers ``magnitudes``, on the values -M..M (M = sum m_i): the items of one
    magnitude k add k * (2 Binomial(c_k, 1/2) - c_k), and the groups convolve."""
    reach = int(magnitudes.sum())
    null = torch.zeros(2 * reach + 1, dtype=torch.float64)
    kinds, counts = torch.unique(magnitudes, return_counts=True)
    span = 0  # the values reached so far: -span..span
    for k, c in zip(kinds.tolist(), counts.tolist(), strict=True):
        j = torch.arange(c + 1, dtype=torch.float64)
        log_pmf = math.lgamma(c + 1) - torch.lgamma(j + 1) - torch.lgamma(c - j + 1) - c * math.log(2.0)
        kernel = torch.zeros(2 * k * c + 1, dtype=torch.float64)
        kernel[:: 2 * k] = log_pmf.exp()  # value k * (2j - c) at index k * (2j - c) + k * c
        if span == 0:
            null[reach - k * c : reach + k * c + 1] = kernel
        else:  # a symmetric kernel: the convolution is the correlation conv1d computes
            part = null[reach - span : reach + span + 1].view(1, 1, -1)
            grown = torch.nn.functional.conv1d(part, kernel.view(1, 1, -1), padding=2 * k * c).view(-1)
            null[reach - span - k * c : reach + span + k * c + 1] = grown
        span += k * c
    return null


def adjust_bh(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values of one family of tests (same order): a test is a
    discovery at false discovery rate q when its adjusted p-value is at most q. NaN entries
    (comparisons not made) stay NaN and are not counted in the family."""
    tested = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    bad = [pvalues[i] for i in tested if not 0.0 <= pvalues[i] <= 1.0]
    if bad:
        raise ValueError(f"p-values must be in [0, 1] (or NaN), got {bad[:3]}")
    adjusted = [math.nan] * len(pvalues)
    running = 1.0
    order = sorted(tested, key=lambda i: pvalues[i])
    for rank in range(len(order), 0, -1):
        i = order[rank - 1]
        running = min(running, pvalues[i] * len(order) / rank)
        adjusted[i] = running
    return adjusted


def paired_bootstrap(
    a: Tensor, b: Tensor, items: Tensor, rounds: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Deprecated (removed in 2.0): use :func:`paired_test`, exact, without the bootstrap's
    p-value floor of ``1 / rounds``.

    (accuracy of ``a`` minus that of ``b``, two-sided p-value) by a paired bootstrap over the
    independent ``items``."""
    warnings.warn(
        "paired_bootstrap is deprecated and will be removed in ats-vit 2.0: use paired_test "
        "(exact, with no p-value floor)",
        DeprecationWarning,
        stacklevel=2,
    )
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
