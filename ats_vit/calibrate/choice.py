"""Which budget a search keeps at a target: each method's best, then one of the methods.

With a few hundred calibration images the most accurate of several methods is often ahead by
noise, and switching to it then costs test accuracy; so ``method="auto"`` keeps its first
member's budget unless another's is significantly more accurate (:func:`prefer`). With a
latency model at hand, the fastest predicted of the equally accurate budgets wins instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ats_vit.calibrate.search import Trial

__all__ = ["SWITCH_Z", "prefer"]

# a member other than the first replaces it only when ahead by more than this many standard
# errors of the paired difference on the calibration images (:func:`prefer`). Chosen with
# AUTO by benchmarks/auto_rule.py on the selection seeds: with ToMe first, never switching
# (z = inf, as z = 2) scored highest; switching at z = 0.5 lost 0.07 points, as the most
# accurate member on a few hundred calibration images is often ahead by noise
SWITCH_Z = math.inf


def each_best(near: list[Trial], methods: tuple[str, ...]) -> list[Trial]:
    """The most accurate trial (then the cheaper) of each of ``methods`` among ``near``, in
    their order."""
    each: dict[str, Trial] = {}
    for t in near:
        name = str(t.budget.method)
        if name not in each or (t.score, -t.cost) > (each[name].score, -each[name].cost):
            each[name] = t
    return [each[m] for m in methods if m in each]


def choose(
    near: list[Trial], methods: tuple[str, ...], images: int, timed: bool, items: Tensor | None = None
) -> Trial:
    """The pick among the budgets ``near`` the target (measured on all ``images``): with a
    latency model (``timed``), the fastest predicted within one calibration image of the most
    accurate; else each method's most accurate (then the cheaper), and of several methods the
    one :func:`prefer` keeps (``items``: the source item of each image, in trial order)."""
    if timed:
        top = max(t.score for t in near)
        equal = [t for t in near if t.score >= top - 1 / images - 1e-9]
        return min(equal, key=lambda t: (t.seconds, -t.score))
    return prefer(each_best(near, methods), items=items)


def prefer(candidates: list[Trial], z: float | None = None, items: Tensor | None = None) -> Trial:
    """Of the best budgets of several methods (in the order they are listed), the first one
    unless another scores higher on the calibration images by more than ``z`` (default
    :data:`SWITCH_Z`) standard errors of the paired difference; of several that do, the
    highest-scoring. ``items`` (the independent item of each image, in the trials' order;
    None: each image its own): the standard error counts items, as images of one item are
    not independent evidence."""
    z = SWITCH_Z if z is None else z
    first, rest = candidates[0], candidates[1:]
    better = [t for t in rest if _ahead(t, first, items) > z]
    return max(better, key=lambda t: (t.score, -t.cost)) if better else first


def _ahead(trial: Trial, other: Trial, items: Tensor | None = None) -> float:
    """How many standard errors ``trial``'s per-image scores lead ``other``'s (paired; the
    cluster-robust standard error over ``items``, which with every image its own item is the
    usual one of the per-image differences)."""
    if trial.per_image is None or other.per_image is None:
        return math.inf if trial.score > other.score else -math.inf
    diff = trial.per_image.double() - other.per_image.double()
    n = len(diff)
    mean = diff.mean().item()
    if mean <= 0:
        return -math.inf if mean < 0 else 0.0
    if items is None or len(items) != n:
        clusters, counts = diff, torch.ones_like(diff)
    else:
        groups = torch.unique(items, return_inverse=True)[1]
        clusters = diff.new_zeros(int(groups.max()) + 1).index_add_(0, groups, diff)
        counts = diff.new_zeros(len(clusters)).index_add_(0, groups, torch.ones_like(diff))
    c = len(clusters)
    if c < 2:
        return math.inf
    spread = math.sqrt(c / (c - 1) * ((clusters - mean * counts) ** 2).sum().item()) / n
    return math.inf if spread == 0 else mean / spread
